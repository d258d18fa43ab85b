"""The leader's part of each checkpoint save, run through `dist.leader_decides` so every rank
returns or raises alike: where the checkpoint is written (`prepare`), and its commit (`commit`):
the manifest, written last through commit.py's protocol, the log line, `on_commit`, then a
retention pass on a background thread (upkeep.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from orchestrator import dist
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.commit import Attempt, commit_strategy, gathered_files
from orchestrator.checkpoint.format import MANIFEST_NAME, Manifest, step_rel
from orchestrator.checkpoint.retention import RetentionHooks
from orchestrator.checkpoint.snapshot import Snapshot
from orchestrator.checkpoint.upkeep import BackgroundRetention, collect_garbage
from orchestrator.config.checkpoint import CheckpointConfig
from orchestrator.storage import Store


class Committer:
    """Commits the checkpoints of one Checkpointer into `store`; its methods run on the leader."""

    def __init__(
        self,
        store: Store,
        config: CheckpointConfig,
        hooks: RetentionHooks,
        *,
        parallel: str,
        config_hash: str,
        on_commit: Callable[[int, dict[str, float]], None] | None,
        log: logging.Logger,
    ) -> None:
        self._store, self._checksums = store, config.verify_checksums
        self._parallel, self._config_hash = parallel, config_hash
        self._on_commit, self._log = on_commit, log
        self._commits = commit_strategy(store, MANIFEST_NAME)
        self._collected_garbage = False
        # Committed manifests already read (retention's scans): each save reads only its own.
        self._manifests: dict[str, CheckpointInfo] = {}
        self._retention = BackgroundRetention(store, config, hooks, self._manifests, log)

    def prepare(self, step: int) -> Attempt:
        """Where checkpoint `step` is written; the first save collects the garbage first."""
        self.collect_garbage_once()
        # A bad checkpoint that the restore fell back past: this run writes its step again.
        if catalog.drop_if_bad(self._store, step_rel(step), checksums=self._checksums):
            self._manifests.pop(step_rel(step), None)
        return self._commits.prepare(step_rel(step))

    def collect_garbage_once(self) -> None:
        """What interrupted saves left (commit.py's GC), once per run: before the first save."""
        if not self._collected_garbage:
            collect_garbage(self._store, self._commits)
            self._collected_garbage = True

    def commit(self, attempt: Attempt, snap: Snapshot, gathered: Any) -> CheckpointInfo:
        """Commit `snap` from every rank's files (`gathered`), with the manifest written last."""
        manifest = self.manifest(attempt, snap, gathered)
        t0 = time.perf_counter()
        self._commits.commit(attempt, manifest.to_json())
        return self.committed(attempt.final_rel, manifest, snap, time.perf_counter() - t0)

    def manifest(self, attempt: Attempt, snap: Snapshot, gathered: Any) -> Manifest:
        """The manifest of `snap` as written by every rank (`gathered`) into `attempt`."""
        return Manifest(
            step=snap.step,
            files=gathered_files(attempt, gathered),
            world_size=dist.world_size(),
            parallel=self._parallel,
            config_hash=self._config_hash,
            metrics=snap.metrics,
            timings=dict(snap.timings),
            data_dir=attempt.data_dir,
        )

    def committed(
        self,
        rel: str,
        manifest: Manifest,
        snap: Snapshot,
        commit_s: float,
        where: Store | None = None,
        **extra: float,
    ) -> CheckpointInfo:
        """After the commit of `manifest` at `rel` (of `where`, default the run dir): the log
        line and `on_commit` (timings and `extra`, e.g. the steps at risk of tiered
        checkpoints)."""
        timings = {**manifest.timings, "commit_s": commit_s}
        self._log_committed((where or self._store).path(rel), manifest, timings, snap)
        if self._on_commit is not None:
            self._on_commit(snap.step, {**timings, **extra})
        info = self._manifests[rel] = CheckpointInfo(snap.step, rel, manifest)
        return info  # retention's scan need not read back what was just written

    def commit_copy(self, attempt: Attempt, manifest: Manifest) -> CheckpointInfo:
        """Commit a copy of a committed checkpoint (tiered: a local commit made durable); its
        files are at `attempt.write_rel` under the names `manifest` lists."""
        copy = replace(
            manifest,
            files={attempt.final_name(name): e for name, e in manifest.files.items()},
            data_dir=attempt.data_dir,
        )
        self._commits.commit(attempt, copy.to_json())
        info = self._manifests[attempt.final_rel] = CheckpointInfo(
            manifest.step, attempt.final_rel, copy
        )
        return info

    def _log_committed(
        self, path: str, manifest: Manifest, timings: dict[str, float], snap: Snapshot
    ) -> None:
        copied = (
            f", copied at the next step {snap.lazy.copied_bytes / 1e6:.1f} MB" if snap.lazy else ""
        )
        self._log.info(
            "committed %s (%.1f MB, %s%s)",
            path,
            manifest.total_bytes / 1e6,
            ", ".join(f"{k} {v:.3f}" for k, v in timings.items()),
            copied,
        )

    def start_retention(self, protected: Collection[int]) -> None:
        """Apply retention after a commit, sparing the `protected` steps (upkeep.py)."""
        self._retention.start(protected=protected)

    def wait(self) -> None:
        """Until the retention pass in progress, if any, is over."""
        self._retention.wait()

    def close(self) -> None:
        self._retention.close()
