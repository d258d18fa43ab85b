"""The leader's upkeep of a run's checkpoints: retention after each commit, on a background
thread, and the garbage interrupted saves left, before the first save.

Retention deletes whole checkpoints, and freeing a large file's blocks is slow on some file
systems (figures: bench/README.md, "Sync save: done"). Run inside the save, it would make
every save that much longer; on its own thread it overlaps the training steps after the save. One pass at a time:
the next pass, the next save and `close()` wait for the one before (`wait`), so a pass never
plans over a checkpoint another is deleting. A kill in the middle of a pass is what it always
was: a manifest goes before its files (retention.py), the next run's plan or GC finishes it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor

from orchestrator.checkpoint import catalog, snapshot
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.commit import CommitStrategy
from orchestrator.checkpoint.format import CHECKPOINTS_DIR, parse_step_dirname
from orchestrator.checkpoint.retention import RetentionHooks, apply_retention, sweep_dropped
from orchestrator.config.checkpoint import RetentionPolicy
from orchestrator.storage import Store


class BackgroundRetention:
    """`start()` a retention pass after a commit; it runs on one thread at a low priority."""

    def __init__(
        self,
        run: Store,
        policy: RetentionPolicy,
        hooks: RetentionHooks,
        manifests: dict[str, CheckpointInfo],
        log: logging.Logger,
    ) -> None:
        self._run, self._policy, self._hooks = run, policy, hooks
        self._manifests, self._log = manifests, log
        self._executor: ThreadPoolExecutor | None = None  # started by the first pass
        self._pass: Future[object] | None = None

    def start(self, protected: Collection[int]) -> None:
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, "stockpot-retention", initializer=snapshot.yield_to_training
            )
        self._pass = self._executor.submit(
            apply_retention, self._run, self._policy, protected=protected, hooks=self._hooks,
            log=self._log, manifests=self._manifests,
        )  # fmt: skip

    def wait(self) -> None:
        """Until the pass in progress, if any, is over (it never raises: retention.py)."""
        done, self._pass = self._pass, None
        if done is not None:
            done.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def collect_garbage(run: Store, commits: CommitStrategy) -> list[str]:
    """Remove what interrupted saves left (see commit.py); uncommitted step dirs count as dead
    when older than the newest commit (a newer one may be a writer still running)."""
    found = catalog.scan(run)
    latest = found.latest()
    newest = latest.step if latest else -1
    dead = [
        rel
        for rel in found.leftovers
        if (parse_step_dirname(rel.rsplit("/", 1)[-1]) or newest + 1) < newest
    ]
    committed = {c.rel: c.manifest.data_dir for c in found.committed}
    swept = sweep_dropped(run, found.committed)  # a thinning cut short by a kill
    return swept + commits.collect_garbage(CHECKPOINTS_DIR, dead=dead, committed=committed)
