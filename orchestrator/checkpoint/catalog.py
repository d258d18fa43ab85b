"""Discovery and verification: what is committed under a run dir, and whether it is whole.

Only checkpoints whose MANIFEST.json exists and parses count. Everything else under
`checkpoints/` is a leftover (an interrupted save, a temp dir) or corrupt (a manifest that does
not parse or names files outside its checkpoint); readers never use either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from orchestrator.checkpoint.format import (
    CHECKPOINTS_DIR,
    CHECKSUM_ALGORITHM,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    hash_stream,
    is_shard_file,
    parse_step_dirname,
)
from orchestrator.errors import CheckpointCorrupt
from orchestrator.logs import LEADER_ONLY
from orchestrator.metric_rules import finite
from orchestrator.storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    rel: str  # relative to the run dir: checkpoints/step-XXXXXXXXX
    manifest: Manifest

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.manifest.metrics

    @property
    def data_rel(self) -> str:
        """Where DCP's files are, relative to the run dir."""
        data_dir = self.manifest.data_dir
        return f"{self.rel}/{data_dir}" if data_dir else self.rel


@dataclass(frozen=True)
class Scan:
    committed: list[CheckpointInfo] = field(default_factory=list)  # ascending by step
    leftovers: list[str] = field(default_factory=list)  # rel paths, not checkpoints
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason)

    def latest(self) -> CheckpointInfo | None:
        return self.committed[-1] if self.committed else None

    def best(self, metric: str, mode: str = "min") -> CheckpointInfo | None:
        scored = [c for c in self.committed if finite(c.metrics.get(metric))]
        if not scored:
            return None
        sign = 1 if mode == "min" else -1
        return min(scored, key=lambda c: (sign * c.metrics[metric], -c.step))

    def select(self, predicate: Callable[[CheckpointInfo], bool]) -> list[CheckpointInfo]:
        return [c for c in self.committed if predicate(c)]


def scan(run: Store, cache: dict[str, CheckpointInfo] | None = None) -> Scan:
    """Classify every entry of `<run>/checkpoints/`.

    `cache` (rel -> info): committed checkpoints already read are taken from it instead of
    reading their manifest again (one GET each on S3), and it is updated to what this scan
    found. Only for a caller that owns the run dir: a committed manifest changes only when its
    owner thins it (retention.drop_optimizer), who then drops its entry."""
    result = Scan()
    names = run.list(CHECKPOINTS_DIR)
    if cache is not None:
        for gone in set(cache) - {f"{CHECKPOINTS_DIR}/{name}" for name in names}:
            del cache[gone]
    for name in names:
        rel = f"{CHECKPOINTS_DIR}/{name}"
        step = parse_step_dirname(name)
        if step is None:
            result.leftovers.append(rel)
            continue
        if cache is not None and rel in cache:
            result.committed.append(cache[rel])
            continue
        try:
            raw = run.read_bytes(f"{rel}/{MANIFEST_NAME}")
        except FileNotFoundError:
            result.leftovers.append(rel)
            continue
        try:
            manifest = Manifest.from_json(raw, where=f"{rel}/{MANIFEST_NAME}")
            if manifest.step != step:
                raise CheckpointCorrupt(f"{rel}/{MANIFEST_NAME}: says step {manifest.step}")
        except CheckpointCorrupt as exc:
            result.corrupt.append((rel, str(exc)))
            continue
        result.committed.append(CheckpointInfo(step, rel, manifest))
        if cache is not None:
            cache[rel] = result.committed[-1]
    result.committed.sort(key=lambda c: c.step)
    return result


def load_info(store: Store) -> CheckpointInfo:
    """The checkpoint whose directory `store` is rooted at (CheckpointCorrupt if uncommitted)."""
    try:
        raw = store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise CheckpointCorrupt(
            f"{store.path()} is not a committed checkpoint (no {MANIFEST_NAME})"
        ) from None
    manifest = Manifest.from_json(raw, where=store.path(MANIFEST_NAME))
    return CheckpointInfo(manifest.step, "", manifest)


def verify(
    ckpt: Store,
    manifest: Manifest,
    *,
    checksums: bool = True,
    chunk: int = 8 << 20,
    names: Collection[str] | None = None,
) -> list[str]:
    """Problems of the checkpoint at `ckpt` against its manifest, each naming a file; [] if whole.
    `chunk`: the read size while hashing; `names`: only these files (default: all).
    `checksums=False` compares the shards' sizes only; the small files are hashed either way:
    they are parsed whole (an unpickler, a JSON parser) and cost next to nothing to hash."""
    present = ckpt.walk_files()
    problems = []
    for name, entry in sorted(manifest.files.items()):
        if names is not None and name not in names:
            continue
        if name not in present:
            problems.append(f"{ckpt.path(name)}: missing")
        elif present[name] != entry.size:
            problems.append(f"{ckpt.path(name)}: size {present[name]} != {entry.size} in manifest")
        elif checksums or not is_shard_file(name):
            with ckpt.open_read(name) as stream:
                got = hash_stream(stream, chunk=chunk)
            if problem := mismatch(ckpt.path(name), got, entry):
                problems.append(problem)
    return problems


def mismatch(path: str, got: FileEntry, want: FileEntry) -> str | None:
    """How a file's size and checksum as read differ from its manifest entry, or None."""
    if got.size != want.size:
        return f"{path}: size {got.size} != {want.size} in manifest"
    if got.checksum != want.checksum:
        return f"{path}: checksum mismatch ({CHECKSUM_ALGORITHM})"
    return None


def small_files(manifest: Manifest) -> set[str]:
    """The files of `manifest` that are not shards: what a restore verifies before it loads."""
    return {name for name in manifest.files if not is_shard_file(name)}


def share(
    manifest: Manifest, rank: int, world: int, names: Collection[str] | None = None
) -> set[str]:
    """The files (of `names`, default all) rank `rank` of `world` verifies on a restore, so all
    ranks read and hash in parallel: each file to the rank with the fewest bytes so far, biggest
    first; every rank computes the same split."""
    loads, mine = [0] * world, set()
    files = [kv for kv in manifest.files.items() if names is None or kv[0] in names]
    for name, entry in sorted(files, key=lambda kv: (-kv[1].size, kv[0])):
        who = loads.index(min(loads))
        loads[who] += entry.size
        if who == rank:
            mine.add(name)
    return mine


def newest_good(
    run: Store, candidates: Iterable[CheckpointInfo], *, checksums: bool
) -> CheckpointInfo | None:
    """The newest candidate that verifies; each one that does not is reported loudly and skipped."""
    for info in sorted(candidates, key=lambda c: c.step, reverse=True):
        problems = verify(run.child(info.rel), info.manifest, checksums=checksums)
        if not problems:
            return info
        report_bad(info, problems)
    return None


def report_bad(info: CheckpointInfo, problems: list[str]) -> None:
    """Say loudly, once (the leader), that a checkpoint failed verification and is skipped."""
    log.error(
        "checkpoint %s FAILED verification, falling back to the previous one: %s",
        info.rel,
        "; ".join(problems[:3]),
        extra=LEADER_ONLY,
    )


def drop_if_bad(run: Store, rel: str, *, checksums: bool) -> bool:
    """Remove the checkpoint at `rel` if its manifest does not parse or it fails verification
    (the save about to write `rel` again, after a resume fell back past it); a checkpoint that
    verifies is left alone (the save then refuses to overwrite it). True if removed."""
    try:
        raw = run.read_bytes(f"{rel}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return False
    try:
        manifest = Manifest.from_json(raw, where=f"{rel}/{MANIFEST_NAME}")
        problems = verify(run.child(rel), manifest, checksums=checksums)
        if manifest.step != parse_step_dirname(rel.rsplit("/", 1)[-1]):
            problems.append(f"{run.path(rel)}: manifest says step {manifest.step}")
    except CheckpointCorrupt as exc:
        problems = [str(exc)]
    if not problems:
        return False
    log.error("removing %s before saving that step again: %s", run.path(rel), problems[0])
    run.delete(rel, recursive=True)
    return True
