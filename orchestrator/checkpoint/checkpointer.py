"""The Checkpointer: register what must survive, save on a schedule, `restore()`; async, retention.

Every rank calls the same methods in the same order. One rank (the leader, global rank 0) picks
where a checkpoint is written and commits it by writing MANIFEST.json last (through the commit
protocol of `commit.py`), applies retention (in the background, `upkeep.py`) and collects
garbage; each decision is broadcast (`dist.leader_decides`) so every rank returns or raises
alike.

    ckpt = Checkpointer(Store(run_dir), policy=RetentionPolicy(keep_last=3),
                        schedule=SaveSchedule(every_steps=100), async_save=True)
    ckpt.register("train", ModelAndOptimizer(model, optim))      # sharded through DCP
    ckpt.register("rng", RNGState(), per_rank=True)               # JSON, one file per rank
    ckpt.restore()                                                # newest checkpoint that verifies
    for step in ...:
        ckpt.maybe_save(step, metrics={"loss": 0.3})              # the schedule decides
    ckpt.save_final(step)                                         # unless saved already; waits
    ckpt.close()                                                  # stops the background thread
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator import dist
from orchestrator.checkpoint import catalog, restoring, snapshot
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.commit import Attempt, commit_strategy, gathered_files
from orchestrator.checkpoint.format import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    decode_rank_state,
    encode_rank_state,
    hash_bytes,
    load_shards,
    rank_state_name,
    save_shards,
    step_rel,
)
from orchestrator.checkpoint.retention import RetentionPolicy
from orchestrator.checkpoint.schedule import SaveSchedule
from orchestrator.checkpoint.snapshot import Key, LazyCopy, live_tensors, stage
from orchestrator.checkpoint.stateful import Handle, Hooks, Stateful
from orchestrator.checkpoint.upkeep import BackgroundRetention, collect_garbage
from orchestrator.dist import one_line
from orchestrator.errors import CheckpointCorrupt, CheckpointError, StockpotError
from orchestrator.logs import LEADER_ONLY
from orchestrator.storage import Store

log = logging.getLogger(__name__)


@dataclass
class _Snapshot:
    step: int
    metrics: dict[str, float]
    shared: dict[str, Any]  # DCP state: sharded or replicated tensors and small objects
    per_rank: bytes | None  # this rank's JSON blob
    timings: dict[str, float] = field(default_factory=dict)
    lazy: LazyCopy | None = None  # the live tensors in `shared`, copied before they change


class Checkpointer:
    def __init__(
        self,
        run: Store,
        *,
        policy: RetentionPolicy | None = None,
        schedule: SaveSchedule | None = None,
        before_save: Callable[[], None] | None = None,
        on_commit: Callable[[int, dict[str, float]], None] | None = None,
        async_save: bool = False,
        verify_checksums: bool = True,
        parallel: str = "",
        config_hash: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`before_save` runs first in every save: what it writes (the metrics lines of the
        steps the checkpoint covers, which a resume never runs again) is durable by the commit."""
        self.run = run
        self.policy = policy or RetentionPolicy()
        self.schedule = schedule or SaveSchedule()
        self._before_save = before_save
        self._on_commit = on_commit  # (step, timings), on the leader, after each commit
        self.async_save = async_save
        self.verify_checksums = verify_checksums
        # Committed manifests already read (retention's scans): each save reads only its own.
        self._manifests: dict[str, CheckpointInfo] = {}
        self.parallel, self.config_hash = parallel, config_hash
        self._clock = clock
        self._entries: dict[str, tuple[Stateful, bool]] = {}
        self._commits = commit_strategy(run, MANIFEST_NAME)
        # Background saves talk on their own gloo group (collective: created by every rank).
        self._group = dist.new_gloo_group() if async_save else None
        self._executor = (
            ThreadPoolExecutor(1, "stockpot-ckpt", initializer=snapshot.yield_to_training)
            if async_save
            else None
        )
        self._in_flight: Future[CheckpointInfo] | None = None
        self._in_flight_step: int | None = None
        self._staging: Any = None  # host copy of the last async save, reused by the next
        # Objects that say before their tensors change (`before_change`) are saved in the
        # background without a copy up front (snapshot.LazyCopy); the rest are staged.
        self._guards: dict[str, Handle] = {}
        self._lazy: LazyCopy | None = None  # of the save in flight
        self._pool: dict[Key, torch.Tensor] = {}  # LazyCopy's buffers, reused save to save
        self._collected_garbage = False
        self._retention = BackgroundRetention(run, self.policy, self._manifests, log)
        # The step whose state was last saved or restored (a fresh start, step 0, needs no
        # save), and when: what the schedule and `save_final` go by.
        self._saved_step, self._saved_time = 0, clock()
        self.last_save_s: float | None = None  # stage to commit, of the newest commit

    # -- registration ---------------------------------------------------------------------

    def register(
        self,
        name: str,
        obj: Stateful | None = None,
        *,
        save: Callable[[], Any] | None = None,
        load: Callable[[Any], None] | None = None,
        per_rank: bool = False,
    ) -> None:
        """Save and restore `obj` (state_dict/load_state_dict) or a save/load hook pair under `name`.

        per_rank=False: one logical state across ranks (tensors may be sharded), through DCP.
        per_rank=True: each rank's own plain state (RNG, data position), as JSON.
        """
        if (obj is None) == (save is None or load is None):
            raise TypeError(
                "register() takes an object with state_dict/load_state_dict, or save= and load="
            )
        if name in self._entries or "." in name or not name:
            raise ValueError(f"checkpoint state name {name!r} is empty, has a dot, or is taken")
        self._entries[name] = (obj if obj is not None else Hooks(save, load), per_rank)  # type: ignore[arg-type]
        guard = getattr(obj, "before_change", None)
        if self.async_save and not per_rank and guard is not None:
            handle = guard(self._freeze)
            if handle is not None:
                self._guards[name] = handle

    # -- saving ---------------------------------------------------------------------------

    def maybe_save(
        self,
        step: int,
        metrics: Mapping[str, float] | None = None,
        *,
        epoch_ended: bool = False,
        epoch: int = 0,
    ) -> bool:
        """Save `step` if the schedule says so; called by the loop after every step, on every
        rank (the time rule is agreed across ranks). True if a save was started."""
        since = self._clock() - self._saved_time
        if not self.schedule.due(step, epoch_ended=epoch_ended, epoch=epoch, since_save_s=since):
            return False
        self.save(step, metrics)
        return True

    def save_final(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Save `step` unless it is already saved (or was restored), and wait for the commit:
        at the end of training or at an agreed stop."""
        if step != self._saved_step:
            self.save(step, metrics)
        self.wait()

    def save(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Save everything registered as checkpoint `step`; with async_save only staging blocks."""
        if self._before_save is not None:
            self._before_save()
        self.wait()  # at most one save in flight; its failure surfaces here
        t0 = time.perf_counter()
        snap = self._snapshot(step, metrics or {}, detach=self.async_save)
        snap.timings["stage_s"] = time.perf_counter() - t0
        if self._executor is None:
            self._write(snap)
        else:
            self._in_flight_step = step
            self._in_flight = self._executor.submit(self._write_guarded, snap)
        self._saved_step, self._saved_time = step, self._clock()

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight (if any) is committed and the retention after it is
        done (on the leader, upkeep.py); raise the save's error if it failed."""
        future, self._in_flight, self._in_flight_step = self._in_flight, None, None
        try:
            return future.result() if future is not None else None
        finally:
            self._retention.wait()

    def close(self) -> None:
        """Commit the save in flight, then stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._retention.close()
            for handle in self._guards.values():
                handle.remove()
            self._guards.clear()

    def _freeze(self) -> None:
        """A guarded object is about to change its tensors: what the save in flight has not
        written yet is copied now (on the training thread; the writer waits for nothing)."""
        lazy = self._lazy
        if lazy is not None:
            lazy.freeze()

    def _snapshot(self, step: int, metrics: Mapping[str, float], *, detach: bool) -> _Snapshot:
        shared: dict[str, Any] = {}
        mine: dict[str, Any] = {}
        for name, (obj, per_rank) in self._entries.items():
            (mine if per_rank else shared)[name] = obj.state_dict()
        lazy = None
        if detach:  # training goes on while the save is written: copies, now or lazily
            eager = {k: v for k, v in shared.items() if k not in self._guards}
            self._staging = stage(eager, self._staging)
            found: list[torch.Tensor] = []
            guarded = {k: live_tensors(v, found) for k, v in shared.items() if k in self._guards}
            shared = {**self._staging, **guarded}
            lazy = self._lazy = LazyCopy(found, self._pool) if found else None
        blob = encode_rank_state(mine) if mine else None
        metric_values = {k: float(v) for k, v in metrics.items()}
        return _Snapshot(step, metric_values, shared, blob, lazy=lazy)

    def _write_guarded(self, snap: _Snapshot) -> CheckpointInfo:
        try:
            return self._write(snap)
        except BaseException as exc:  # even another rank's interrupt: training must hear of it
            if isinstance(exc, StockpotError):
                raise
            raise CheckpointError(
                f"background save of step {snap.step} failed: {one_line(exc)}"
            ) from exc

    def _write(self, snap: _Snapshot) -> CheckpointInfo:
        group = self._group
        t0 = time.perf_counter()
        attempt = dist.leader_decides(lambda: self._prepare(snap.step), group)
        where = attempt.or_raise(CheckpointError, f"step {snap.step} not saved: ")
        try:
            records = save_shards(snap.shared, self.run, where.write_rel, group, snap.lazy)
        finally:
            if snap.lazy is not None:
                snap.lazy.done()
        local = self._write_rank_state(where.write_rel, snap.per_rank)
        gathered = dist.gather_objects((records, local), dst=dist.LEADER, group=group)
        snap.timings["write_s"] = time.perf_counter() - t0
        committed = dist.leader_decides(lambda: self._commit(where, snap, gathered), group)
        info = committed.or_raise(CheckpointError, f"step {snap.step} not committed: ")
        self.last_save_s = snap.timings["stage_s"] + time.perf_counter() - t0
        return info

    def _write_rank_state(
        self, rel: str, blob: bytes | None
    ) -> tuple[dict[str, FileEntry], str | None]:
        if blob is None:
            return {}, None
        name = rank_state_name(dist.rank())
        try:
            self.run.write_bytes(f"{rel}/{name}", blob)
        except Exception as exc:  # reported through the gather: a raise here would hang the others
            return {}, f"rank {dist.rank()}: {one_line(exc)}"
        return {name: hash_bytes(blob)}, None

    # -- the leader's part (run through dist.leader_decides) ----------------------------------

    def _prepare(self, step: int) -> Attempt:
        if not self._collected_garbage:
            collect_garbage(self.run, self._commits)
            self._collected_garbage = True
        # A bad checkpoint that the restore fell back past: this run writes its step again.
        if catalog.drop_if_bad(self.run, step_rel(step), checksums=self.verify_checksums):
            self._manifests.pop(step_rel(step), None)
        return self._commits.prepare(step_rel(step))

    def _commit(self, attempt: Attempt, snap: _Snapshot, gathered: Any) -> CheckpointInfo:
        files = gathered_files(attempt, gathered)
        t0 = time.perf_counter()
        timings = dict(snap.timings)
        manifest = Manifest(
            step=snap.step,
            files=files,
            world_size=dist.world_size(),
            parallel=self.parallel,
            config_hash=self.config_hash,
            metrics=snap.metrics,
            timings=timings,
            data_dir=attempt.data_dir,
        )
        self._commits.commit(attempt, manifest.to_json())
        timings["commit_s"] = time.perf_counter() - t0
        copied = (
            f", copied at the next step {snap.lazy.copied_bytes / 1e6:.1f} MB" if snap.lazy else ""
        )
        log.info(
            "committed %s (%.1f MB, %s%s)",
            self.run.path(attempt.final_rel),
            manifest.total_bytes / 1e6,
            ", ".join(f"{k} {v:.3f}" for k, v in timings.items()),
            copied,
        )
        if self._on_commit is not None:
            self._on_commit(snap.step, timings)
        info = self._manifests[attempt.final_rel] = CheckpointInfo(
            snap.step, attempt.final_rel, manifest
        )  # retention's scan need not read back what was just written
        self._retention.start(
            protected=() if self._in_flight_step is None else (self._in_flight_step,)
        )
        return info

    # -- restoring ------------------------------------------------------------------------

    def restore(self, step: int | None = None) -> CheckpointInfo | None:
        """Load the newest committed checkpoint that verifies (or exactly `step`) into everything
        registered. A checkpoint that fails verification is reported and the previous one used
        (restoring.py: the newest is checked while it loads, so it is read once).
        Returns what was loaded, or None if nothing is committed; raises CheckpointCorrupt
        when committed checkpoints exist and none verifies."""
        listed = dist.leader_decides(lambda: restoring.candidates(self.run, step), self._group)
        infos = listed.or_raise(CheckpointCorrupt)  # newest first
        shared = {
            name: obj.state_dict()
            for name, (obj, per_rank) in self._entries.items()
            if not per_rank
        }

        def load(info: CheckpointInfo) -> None:
            load_shards(shared, self.run, info.data_rel, self._group)

        info = restoring.newest_loaded(
            self.run, infos, load if shared else None, self._group,
            checksums=self.verify_checksums, exact=step is not None,
        )  # fmt: skip
        if info is None:
            return None
        for name, state in shared.items():
            self._entries[name][0].load_state_dict(state)
        self._restore_rank_state(info)
        self._saved_step, self._saved_time = info.step, self._clock()
        log.info("restored %s (step %d)", self.run.path(info.rel), info.step, extra=LEADER_ONLY)
        return info

    def _restore_rank_state(self, info: CheckpointInfo) -> None:
        per_rank = [name for name, (_, flag) in self._entries.items() if flag]
        if not per_rank:
            return
        name = info.manifest.data_path(rank_state_name(dist.rank()))
        if name not in info.manifest.files:
            log.warning(
                "%s has no per-rank state for rank %d (saved with world size %d): %s not restored",
                info.rel,
                dist.rank(),
                info.manifest.world_size,
                ", ".join(per_rank),
            )
            return
        state = decode_rank_state(self.run.read_bytes(f"{info.rel}/{name}"))
        for key in per_rank:
            if key in state:
                self._entries[key][0].load_state_dict(state[key])
