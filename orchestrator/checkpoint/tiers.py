"""The local tier of tiered checkpoints: every save commits to node-local storage first
(`checkpoint.local_dir`), and uploader.py makes it durable in `run.dir` in the background.

On each node the tier is a run dir of its own, with only what that node's ranks wrote:

    <local_dir>/TIER.json                       {"run": <run.dir URL>}: whose tier this is
    <local_dir>/checkpoints/step-000001000/     committed iff MANIFEST.json inside parses:
        MANIFEST.json                           the whole checkpoint's manifest (every node's files)
        .metadata                               DCP's index, copied to every node
        __<rank>_0.distcp, ranks/rank-<rank>.json, ...   the files this node's ranks wrote

A local commit is commit.py's rename protocol run by each node's first rank with the manifest
the leader built: the files are fsynced, the manifest is written last, the directory renamed into
place. A node whose commit did not happen holds only a temp dir, which restores ignore; a
restore takes each file from the node's copy when it holds one that matches the manifest, else
from the durable tier (tiered_restore.py), so a step only some nodes committed is still whole
wherever the durable tier has it.

Ranks share a tier when they run on the same host with the same resolved `local_dir` (two nodes
of a test rig on one machine name theirs apart, e.g. with `${oc.env:SLURMD_NODENAME}`). A tier
that names another run is swept (its checkpoints removed) when a run claims it.
"""

from __future__ import annotations

import json
import logging
import os
import socket

from orchestrator import dist
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.format import (
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    METADATA_NAME,
    TMP_PREFIX,
    step_dirname,
    step_rel,
)
from orchestrator.dist import Group, one_line
from orchestrator.errors import ConfigError
from orchestrator.storage import Store

log = logging.getLogger(__name__)

TIER_RECORD = "TIER.json"


def local_store(local_dir: str, run: Store) -> Store:
    """The local tier's store; a ConfigError for a directory that cannot be one."""
    store = Store(local_dir)
    if not store.local_paths:
        raise ConfigError(
            f"checkpoint.local_dir must be a directory on the node (got {local_dir!r}); "
            "the durable copy goes to run.dir"
        )
    if run.local_paths and os.path.realpath(store.path()) == os.path.realpath(run.path()):
        raise ConfigError(
            f"checkpoint.local_dir is run.dir ({local_dir}); give it a node-local directory, "
            "e.g. /tmp/stockpot/${run.name}, or set it to null"
        )
    return store


class LocalTier:
    """This node's tier; built by every rank alike (collective on `group`)."""

    def __init__(self, store: Store, run: Store, group: Group = None) -> None:
        self.store, self._run = store, run
        key = (socket.gethostname(), os.path.realpath(store.path()))
        keys = dist.all_gather_objects(key, group)
        self.node_ranks = [r for r, k in enumerate(keys) if k == key]
        self.nodes = len(set(keys))
        self.is_node_leader = self.node_ranks[0] == dist.rank()
        claimed = self._claim() if self.is_node_leader else None
        problems = [p for p in dist.all_gather_objects(claimed, group) if p]
        if problems:
            raise ConfigError(problems[0])

    def _claim(self) -> str | None:
        """Make the tier this run's: sweep one that another run (or a crash) left."""
        try:
            self.store.makedirs(CHECKPOINTS_DIR)
            try:
                owner = json.loads(self.store.read_bytes(TIER_RECORD)).get("run")
            except FileNotFoundError:
                owner = None
            if owner is not None and owner != self._run.url:
                log.warning(
                    "local tier %s held checkpoints of another run (%s): removed",
                    self.store.path(),
                    owner,
                )
                self.store.delete(CHECKPOINTS_DIR, recursive=True)
                self.store.makedirs(CHECKPOINTS_DIR)
            for name in self.store.list(CHECKPOINTS_DIR):
                if name.startswith(TMP_PREFIX):  # an interrupted local save
                    self.store.delete(f"{CHECKPOINTS_DIR}/{name}", recursive=True)
            self.store.write_bytes(TIER_RECORD, json.dumps({"run": self._run.url}).encode())
        except OSError as exc:
            return f"checkpoint.local_dir {self.store.path()} is not usable: {one_line(exc)}"
        return None

    # -- saving ---------------------------------------------------------------------------

    @staticmethod
    def attempt_rel(step: int, nonce: str) -> str:
        """Where every rank of every node writes step's files (the same name on each node)."""
        return f"{CHECKPOINTS_DIR}/{TMP_PREFIX}{step_dirname(step)}-{nonce}"

    def begin(self, rel: str) -> None:
        self.store.makedirs(rel)

    def commit(self, rel: str, step: int, manifest: bytes, metadata: bytes | None) -> str | None:
        """This node's commit of `rel` as step's local checkpoint (its first rank; the others
        return None): DCP's index where the node lacks it, fsync, manifest last, rename. The
        problem in one line, or None."""
        if not self.is_node_leader:
            return None
        final = step_rel(step)
        try:
            if metadata is not None and not self.store.exists(f"{rel}/{METADATA_NAME}"):
                self.store.write_bytes(f"{rel}/{METADATA_NAME}", metadata)
            self.store.fsync_tree(rel)
            self.store.write_bytes(f"{rel}/{MANIFEST_NAME}", manifest)
            if self.store.exists(final):  # saved again after a restore fell back past it
                self.store.delete(final, recursive=True)
            self.store.rename_dir(rel, final)
        except OSError as exc:
            return f"local tier on {socket.gethostname()}: {one_line(exc)}"
        return None

    def metadata(self, rel: str) -> bytes:
        """DCP's index as the leader wrote it (the leader's node has it)."""
        return self.store.read_bytes(f"{rel}/{METADATA_NAME}")

    # -- what it holds --------------------------------------------------------------------

    def committed(self) -> list[CheckpointInfo]:
        """This node's local commits, ascending by step."""
        return catalog.scan(self.store).committed

    def prune(self, keep: int, spare: set[int]) -> None:
        """Keep the `keep` newest local commits and `spare` (an upload in flight); the node's
        first rank removes the rest (a failure is logged: the next prune tries again)."""
        if not self.is_node_leader:
            return
        steps = [c.step for c in self.committed()]
        for step in steps[: max(0, len(steps) - keep)]:
            if step in spare:
                continue
            try:
                self.store.delete(f"{step_rel(step)}/{MANIFEST_NAME}")  # uncommitted first
                self.store.delete(step_rel(step), recursive=True)
            except OSError as exc:
                log.warning("could not remove local step %d: %s", step, one_line(exc))
