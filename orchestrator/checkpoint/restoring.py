"""Which checkpoint a restore loads: the newest committed full one that verifies, read once.

Verification (sizes and xxh3 of every file against the manifest) is split between the ranks
(catalog.share). Nothing is parsed before it verifies: the small files (DCP's `.metadata`, an
unpickler's input on every rank; the per-rank state JSON) are checked, and the outcome agreed,
before the load starts. The newest candidate's shards are hashed by the load itself (format's
Tap): each file a rank's load reads mostly is read front to back and hashed as it goes, so the
bulk of the checkpoint is read once, not twice (on S3, downloaded once; on disk, a cold read
saved when it is bigger than the page cache); the files no rank's load read so are checked
apart, split between the ranks, after the load. A candidate is used only when every rank's
checks pass; a bad one is reported and the previous one verified first, then loaded, over
whatever the bad one left in the state.

When committed checkpoints exist and none verifies, the restore raises: starting the run over
would train from scratch on top of a state that may hold part of a bad checkpoint, and its
retention would then delete checkpoints that failed only because their storage misread them
this once. Nothing committed at all is a fresh start (None).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from orchestrator import dist
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.errors import CheckpointCorrupt
from orchestrator.storage import Store

if TYPE_CHECKING:
    from orchestrator.checkpoint.format import Tap

# Reads a checkpoint into the registered state (hashing what the Tap asks for, when given).
Load = Callable[[CheckpointInfo, "Tap | None"], None]


def candidates(run: Store, step: int | None) -> list[CheckpointInfo]:
    """Committed full checkpoints, newest first (exactly `step` when given). A weights-only
    one (retention dropped its optimizer state) is never resumed. The leader's part."""
    committed = [c for c in catalog.scan(run).committed if not c.manifest.weights_only]
    chosen = [c for c in committed if step is None or c.step == step]
    if step is not None and not chosen:
        raise CheckpointCorrupt(
            f"no committed full checkpoint at step {step} in {run.path()} "
            "(a weights-only one, kept for soups, cannot be resumed)"
        )
    return sorted(chosen, key=lambda c: c.step, reverse=True)


def newest_loaded(
    run: Store,
    infos: list[CheckpointInfo],
    load: Load | None,
    group: Any,
    *,
    checksums: bool,
    exact: bool,
) -> CheckpointInfo | None:
    """Load the first of `infos` (newest first) that verifies on every rank; None if there
    are none. `exact`: the one asked for by step, raised if bad. Collective."""
    for i, info in enumerate(infos):
        if load is not None and i == 0:
            problems = _load_while_verifying(run, info, load, group, checksums=checksums)
        else:
            problems = _problems(run, info, group, checksums=checksums)
            if not problems and load is not None:
                load(info, None)
        if not problems:
            return info
        if exact:
            raise CheckpointCorrupt("; ".join(problems))
        catalog.report_bad(info, problems)
    if infos:
        raise CheckpointCorrupt(
            f"none of the {len(infos)} committed checkpoint(s) in {run.path()} verifies, so "
            "the run does not start over on top of them: check the storage, then repair or "
            f"remove them (`stockpot verify {run.path()}` lists each problem), or use a new "
            "run.dir"
        )
    return None


def _problems(run: Store, info: CheckpointInfo, group: Any, *, checksums: bool) -> list[str]:
    """Every rank checks its share of the files; all learn every problem."""
    return _everyones(_my_share(run, info, group, checksums), group)


def _everyones(found: list[str], group: Any) -> list[str]:
    """Every rank's problems, on every rank (collective)."""
    return [p for ps in dist.all_gather_objects(found, group) for p in ps]


def _load_while_verifying(
    run: Store, info: CheckpointInfo, load: Load, group: Any, *, checksums: bool
) -> list[str]:
    """The small files first, then `load`, which hashes the shards it reads (a Tap); then the
    shards no rank's load hashed are checked apart. Every rank's load unpickles `.metadata`
    and each rank parses its own state file, so the small files are checked (split between
    the ranks) and the outcome agreed before any load starts: a bad one is reported once,
    never parsed (DCP logs what its reader raised with a traceback, on every rank). A load
    that fails on a checkpoint whose checks fail is one more sign it is bad; one that fails on
    a checkpoint that verifies is raised (DCP fails every rank's load alike)."""
    from orchestrator.checkpoint.format import Tap

    small = catalog.small_files(info.manifest)
    problems = _everyones(_my_share(run, info, group, checksums, small), group)
    if problems:
        return problems
    manifest = info.manifest
    shards = set(manifest.files) - small
    data = {n: e for n, e in manifest.data_files().items() if manifest.data_path(n) in shards}
    tap = Tap(data) if checksums else None
    failed: BaseException | None = None
    try:
        load(info, tap)
    except Exception as exc:
        failed = exc
    got = tap.got if tap is not None else {}
    ckpt = run.child(info.rel)
    found = [
        problem
        for name, entry in sorted(got.items())
        if (problem := catalog.mismatch(ckpt.path(manifest.data_path(name)), entry, data[name]))
    ]
    hashed = {
        manifest.data_path(n) for ns in dist.all_gather_objects(sorted(got), group) for n in ns
    }
    found += _my_share(run, info, group, checksums, shards - hashed)
    problems = _everyones(found, group)
    if failed is not None and not problems:
        raise failed
    return problems


def _my_share(
    run: Store,
    info: CheckpointInfo,
    group: Any,
    checksums: bool,
    among: Collection[str] | None = None,
) -> list[str]:
    """Problems in this rank's share of the files `among` (default: all of them)."""
    mine = catalog.share(info.manifest, dist.rank(), dist.world_size(group), among)
    if not mine:  # more ranks than small files: no listing (a request on S3) for nothing
        return []
    return catalog.verify(run.child(info.rel), info.manifest, checksums=checksums, names=mine)
