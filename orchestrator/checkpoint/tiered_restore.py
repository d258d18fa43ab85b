"""Restoring tiered checkpoints: the newest step some tier holds whole for every rank, each file
from the fastest copy that verifies.

The candidates are the steps committed on the durable tier (run.dir) or on any node's local
tier, newest first. For each, every rank works out which files its load reads (DCP's local
plan, from the step's `.metadata`) and where it reads each one: its node's copy when the node
committed the step and the copy has the manifest's size, else the durable copy. When some rank
cannot reach a file (a step committed only on other nodes, or wiped there), every rank moves on
to the next candidate together: a local-only step is never resumed by ranks that cannot read it.

Verification is restoring.py's, per copy: every copy some rank reads is checked against the
manifest, by the load that reads it (format's Tap: a copy a rank's load reads mostly is hashed
as it is read) or else, after the load, by one of the ranks that read it (spread by bytes). A
bad node copy is removed and the step loaded again from the durable tier; a bad durable copy
makes the step bad, as without tiers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from orchestrator import dist
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.format import (
    METADATA_NAME,
    FileEntry,
    Manifest,
    Tap,
    Unreachable,
    hash_stream,
    is_shard_file,
    load_shards,
    needed_files,
    rank_state_name,
    read_metadata,
    step_rel,
)
from orchestrator.checkpoint.tiers import LocalTier
from orchestrator.dist import Group, one_line
from orchestrator.errors import CheckpointCorrupt, CheckpointError
from orchestrator.logs import LEADER_ONLY
from orchestrator.storage import Store

log = logging.getLogger("orchestrator.checkpoint.checkpointer")

DURABLE = "durable"


@dataclass(frozen=True)
class Candidate:
    step: int
    durable: Manifest | None  # its manifest on the durable tier, if committed there
    local: Manifest | None  # its manifest as some node committed it locally
    nodes: frozenset[int]  # the first ranks of the nodes that committed it locally

    @property
    def manifest(self) -> Manifest:
        found = self.durable or self.local
        assert found is not None
        return found


@dataclass
class Restored:
    info: CheckpointInfo  # as the durable tier lists it when it has it, else the node's
    tier: str  # "local", "durable" or "local+durable": where this rank's bytes came from
    absent: list[str]  # optional states the checkpoint does not hold
    rank_state: bytes | None  # this rank's per-rank state file, if the checkpoint has one


def candidates(tier: LocalTier, run: Store, step: int | None, group: Group) -> list[Candidate]:
    """Every step committed on some tier (exactly `step` when given), newest first; the same
    list on every rank (collective)."""
    durable = dist.leader_decides(
        lambda: {c.step: c.manifest for c in catalog.scan(run).committed}, group
    ).or_raise(CheckpointCorrupt)
    mine = {c.step: c.manifest for c in tier.committed()} if tier.is_node_leader else {}
    everyone = dist.all_gather_objects(mine, group)
    found: list[Candidate] = []
    for s in sorted({*durable, *(s for node in everyone for s in node)}, reverse=True):
        if step is not None and s != step:
            continue
        nodes = frozenset(r for r, node in enumerate(everyone) if s in node)
        local = next((node[s] for node in everyone if s in node), None)
        c = Candidate(s, durable.get(s), local, nodes)
        if not c.manifest.weights_only:
            found.append(c)
    if step is not None and not found:
        raise CheckpointCorrupt(
            f"no committed full checkpoint at step {step} in {run.path()} or its local tiers"
        )
    return found


class _Copies:
    """This rank's view of one candidate: each file's name (as DCP names it) -> (store, path)."""

    def __init__(self, c: Candidate, tier: LocalTier, run: Store) -> None:
        self.c, self.entries = c, c.manifest.data_files()
        here = c.local is not None and tier.node_ranks[0] in c.nodes
        self.sources: dict[str, tuple[Store, str]] = {}
        self.kinds: dict[str, str] = {}  # name -> DURABLE or this node's key
        node = f"node-{tier.node_ranks[0]}"
        durable_dir = step_rel(c.step)
        if c.durable is not None and c.durable.data_dir:
            durable_dir = f"{durable_dir}/{c.durable.data_dir}"
        present = tier.store.walk_files(step_rel(c.step)) if here else {}
        for name, entry in self.entries.items():
            if present.get(name) == entry.size:
                self.sources[name] = (tier.store, f"{step_rel(c.step)}/{name}")
                self.kinds[name] = node
            elif c.durable is not None:
                self.sources[name] = (run, f"{durable_dir}/{name}")
                self.kinds[name] = DURABLE

    def drop_local(self, names: set[str], tier: LocalTier) -> None:
        """Forget (and remove) node copies found bad: the durable copies are read instead."""
        for name in names:
            store, rel = self.sources[name]
            if self.kinds[name] != DURABLE:
                store.delete(rel)


def restore(
    tier: LocalTier,
    run: Store,
    shared: dict[str, Any],
    optional: list[str],
    step: int | None,
    group: Group,
    *,
    checksums: bool,
    found: list[Candidate] | None = None,
) -> Restored | None:
    """Load the newest candidate every rank can read whole and that verifies into `shared`
    (`optional`: states that may be absent, left out then). None if nothing is committed.
    `found`: the candidates, when the caller listed them already (every step)."""
    if found is None:
        found = candidates(tier, run, step, group)
    elif step is not None:
        found = [c for c in found if c.step == step]
        if not found:
            raise CheckpointCorrupt(
                f"no committed full checkpoint at step {step} in {run.path()} or its local tiers"
            )
    for c in found:
        copies = _Copies(c, tier, run)
        for retry in (False, True):
            outcome = _try(copies, shared, optional, group, checksums=checksums)
            if isinstance(outcome, Restored):
                return outcome
            bad_local, anywhere, problems = outcome
            if anywhere and not retry and c.durable is not None:
                log.warning(
                    "step %d: a node copy failed verification (%s); reading it from %s",
                    c.step, problems[0], run.path(), extra=LEADER_ONLY,
                )  # fmt: skip
                copies.drop_local(bad_local, tier)
                copies = _Copies(c, tier, run)
                continue
            if step is not None:
                raise CheckpointCorrupt("; ".join(problems))
            log.warning(
                "step %d cannot be restored (%s); trying the one before",
                c.step, problems[0], extra=LEADER_ONLY,
            )  # fmt: skip
            break
    if found:
        raise CheckpointCorrupt(
            f"none of the {len(found)} committed checkpoint(s) of {run.path()} (on any tier) "
            "can be restored: check the storage, then repair or remove them (`stockpot verify "
            f"{run.path()}` lists each problem), or use a new run.dir"
        )
    return None


Failed = tuple[set[str], bool, list[str]]  # this rank's bad node copies, any rank's, problems


def _try(
    copies: _Copies, shared: dict[str, Any], optional: list[str], group: Group, *, checksums: bool
) -> Restored | Failed:
    """One load of a candidate (collective): the Restored, or why not."""
    c, me = copies.c, dist.rank()
    mine = rank_state_name(me)
    small = [n for n in (METADATA_NAME, mine) if n in copies.entries]
    problems = [f"rank {me} cannot reach {n}" for n in small if n not in copies.sources]
    found = [
        (n, p) for n in small if n in copies.sources and (p := _check(copies, n, checksums=True))
    ]
    problems += [p for _, p in found]
    needed: set[str] = set()
    absent: list[str] = []
    if not problems:
        try:
            store, rel = copies.sources[METADATA_NAME]
            metadata = read_metadata(store, rel.rsplit("/", 1)[0])
            keys = set(metadata.state_dict_metadata)
            absent = [n for n in optional if not any(k.startswith(n + ".") for k in keys)]
            present = {k: v for k, v in shared.items() if k not in absent}
            needed = needed_files(present, metadata) | set(small)
        except (KeyError, CheckpointError) as exc:
            problems.append(f"rank {me}: {one_line(exc)}" if str(exc) else f"rank {me}: {exc!r}")
    missing = sorted(needed - set(copies.sources))
    if missing:
        problems.append(f"rank {me} cannot reach {missing[0]} (committed on other nodes only)")
    everyone = dist.all_gather_objects(
        (problems, sorted((n, copies.kinds[n]) for n in needed if n in copies.kinds)), group
    )
    problems = [p for ps, _ in everyone for p in ps]
    if problems:
        return _failed(copies, found, problems, group)
    tap = Tap({n: copies.entries[n] for n in needed if is_shard_file(n)}) if checksums else None
    failed: BaseException | None = None
    try:
        load_shards({k: v for k, v in shared.items() if k not in absent}, run_of(copies),
                    "", group, copies.sources, tap)  # fmt: skip
    except (CheckpointError, Unreachable) as exc:
        failed = exc
    got = tap.got if tap is not None else {}
    found = [(n, p) for n, entry in sorted(got.items()) if (p := _mismatch(copies, n, entry))]
    hashed = {tuple(pair) for pairs in dist.all_gather_objects(
        sorted((n, copies.kinds[n]) for n in got), group) for pair in pairs}  # fmt: skip
    reads = [[p for p in pairs if tuple(p) not in hashed] for _, pairs in everyone]
    found += _check_all(copies, _my_checks(copies, reads, me), checksums)
    problems = [p for ps in dist.all_gather_objects([p for _, p in found], group) for p in ps]
    if failed is not None and not problems:
        raise failed
    if problems:
        return _failed(copies, found, problems, group)
    kinds = {copies.kinds[n] for n in needed}
    tier = "+".join(sorted({"durable" if k == DURABLE else "local" for k in kinds}))
    blob = _read(copies, mine) if mine in copies.entries else None
    info = CheckpointInfo(c.step, step_rel(c.step), c.manifest)
    return Restored(info, tier, absent, blob)


def _failed(
    copies: _Copies, found: list[tuple[str, str]], problems: list[str], group: Group
) -> Failed:
    """Why a candidate failed, and whether some rank found a bad node copy (agreed)."""
    bad = {n for n, _ in found if copies.kinds.get(n, DURABLE) != DURABLE}
    return bad, dist.agree(bool(bad), group), problems


def run_of(copies: _Copies) -> Store:
    """Any store of the candidate's (DCP wants a path; every file is routed by `sources`)."""
    return next(iter(copies.sources.values()))[0]


def _my_checks(copies: _Copies, reads: list[list[tuple[str, str]]], me: int) -> list[str]:
    """The shard copies this rank checks: each copy some rank reads goes to the reader of that
    copy with the fewest bytes so far (every rank computes the same split)."""
    readers: dict[tuple[str, str], list[int]] = {}
    for rank, pairs in enumerate(reads):
        for pair in pairs:
            readers.setdefault(tuple(pair), []).append(rank)  # type: ignore[arg-type]
    loads = [0] * len(reads)
    mine = []
    for (name, _kind), ranks in sorted(readers.items(), key=lambda kv: kv[0]):
        if not is_shard_file(name):
            continue
        who = min(ranks, key=lambda r: (loads[r], r))
        loads[who] += copies.entries[name].size
        if who == me:
            mine.append(name)
    return mine


def _check_all(copies: _Copies, names: list[str], checksums: bool) -> list[tuple[str, str]]:
    return [(n, p) for n in names if (p := _check(copies, n, checksums=checksums))]


def _mismatch(copies: _Copies, name: str, got: FileEntry) -> str | None:
    """How this rank's copy of `name`, as its load read it, differs from the manifest."""
    store, rel = copies.sources[name]
    return catalog.mismatch(store.path(rel), got, copies.entries[name])


def _check(copies: _Copies, name: str, *, checksums: bool) -> str | None:
    """The problem with this rank's copy of `name`, or None."""
    store, rel = copies.sources[name]
    entry = copies.entries[name]
    try:
        size = store.size(rel)
        if size != entry.size:
            return f"{store.path(rel)}: size {size} != {entry.size} in manifest"
        if checksums or not is_shard_file(name):
            with store.open_read(rel) as stream:
                return _mismatch(copies, name, hash_stream(stream))
    except FileNotFoundError:
        return f"{store.path(rel)}: missing"
    return None


def _read(copies: _Copies, name: str) -> bytes:
    store, rel = copies.sources[name]
    return store.read_bytes(rel)
