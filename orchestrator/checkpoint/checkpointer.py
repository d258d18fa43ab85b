"""The Checkpointer: register what must survive, save on a schedule, `restore()`; async, retention.

Every rank calls the same methods in the same order. One rank (the leader, global rank 0) picks
where a checkpoint is written and commits it by writing MANIFEST.json last, applies retention
and collects garbage (`committer.py`); each decision is broadcast (`dist.leader_decides`) so
every rank returns or raises alike. With async_save a save is written on a thread of its own
while training goes on (`background.py`); without it, `save` returns once it is committed.

    ckpt = Checkpointer(Store(run_dir),
                        config=CheckpointConfig(every_steps=100, keep_last=3, async_save=True))
    ckpt.register("train", ModelAndOptimizer(model, optim))      # sharded through DCP
    ckpt.register("rng", RNGState(), per_rank=True)               # JSON, one file per rank
    ckpt.restore()                                                # newest checkpoint that verifies
    for step in ...:
        ckpt.maybe_save(step, metrics={"loss": 0.3})              # the schedule decides
    ckpt.save_final(step)                                         # unless saved already; waits
    ckpt.close()                                                  # stops the background thread
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from orchestrator import dist
from orchestrator.checkpoint import restoring
from orchestrator.checkpoint.background import BackgroundSaver
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.commit import Attempt
from orchestrator.checkpoint.committer import Committer
from orchestrator.checkpoint.format import (
    FileEntry,
    Tap,
    decode_rank_state,
    encode_rank_state,
    hash_bytes,
    load_shards,
    rank_state_name,
    save_shards,
    stored_items,
)
from orchestrator.checkpoint.retention import NO_HOOKS, RetentionHooks
from orchestrator.checkpoint.schedule import due
from orchestrator.checkpoint.snapshot import Snapshot
from orchestrator.checkpoint.stateful import Hooks, Stateful
from orchestrator.checkpoint.tiered import OnDurable, Tiered
from orchestrator.config.checkpoint import CheckpointConfig
from orchestrator.dist import Group, one_line
from orchestrator.errors import CheckpointCorrupt, CheckpointError
from orchestrator.logs import LEADER_ONLY
from orchestrator.storage import Store

log = logging.getLogger(__name__)

# Without a config a Checkpointer saves only when told and deletes nothing: the soup writer
# commits into a training run's dir, whose checkpoints a default keep_last must never thin.
MANUAL = CheckpointConfig(every_steps=None, keep_last=None)


class Checkpointer:
    """What to save (`register`), and every rank's part of a save and a restore. With async_save
    the writes run on `background` (a BackgroundSaver); the leader's part of each save is the
    Committer's."""

    def __init__(
        self,
        store: Store,
        *,
        config: CheckpointConfig = MANUAL,
        retention_hooks: RetentionHooks = NO_HOOKS,
        before_save: Callable[[], None] | None = None,
        on_commit: Callable[[int, dict[str, float]], None] | None = None,
        parallel: str = "",
        config_hash: str = "",
        clock: Callable[[], float] = time.monotonic,
        after_first_step: Callable[[int], None] | None = None,
        on_durable: OnDurable | None = None,
    ) -> None:
        """`config` is the `checkpoint:` section as loaded: its SaveSchedule drives `maybe_save`,
        its RetentionPolicy (and `retention_hooks`, the Python API's predicates) retention.
        `before_save` runs first in every save: what it writes (the metrics lines of the steps
        the checkpoint covers, which a resume never runs again) is durable by the commit.
        `after_first_step` runs once, when `maybe_save` is first offered a step (the session's
        start-up timing). With `config.local_dir`, saves commit on each node first and are made
        durable in `store` in the background (tiered.py); `on_durable` hears of each."""
        self.store = store
        self._after_first_step = after_first_step
        self.config = config
        self._before_save = before_save
        self._clock = clock
        self._entries: dict[str, tuple[Stateful, bool]] = {}
        # With async_save (collective: created by every rank alike); a sync save has none.
        self.background = BackgroundSaver() if config.async_save else None
        self._committer = Committer(
            store, config, retention_hooks, parallel=parallel, config_hash=config_hash,
            on_commit=on_commit, log=log,
        )  # fmt: skip
        self._tiered = (
            Tiered(store, config, self._committer, on_durable=on_durable)
            if config.local_dir is not None
            else None
        )
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
        entry = obj if obj is not None else Hooks(save, load)  # type: ignore[arg-type]
        self._entries[name] = (entry, per_rank)
        if self.background is not None and not per_rank:
            self.background.guard(name, entry)

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
        if self._after_first_step is not None:
            first, self._after_first_step = self._after_first_step, None
            first(step)
        since = self._clock() - self._saved_time
        if not due(self.config, step, epoch_ended=epoch_ended, epoch=epoch, since_save_s=since):
            return False
        self.save(step, metrics)
        return True

    def save_final(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Save `step` unless it is already saved (or was restored), and wait for the commit:
        at the end of training or at an agreed stop."""
        if step != self._saved_step:
            self.save(step, metrics)
        self.wait()
        if self._tiered is not None:
            self._tiered.make_durable()

    def flush_durable(self, deadline: float) -> tuple[bool, int | None] | None:
        """With tiers, make the newest local commit durable before `deadline` (monotonic):
        (whether it is, the newest durable step); None without tiers (every commit is)."""
        return self._tiered.flush(deadline) if self._tiered is not None else None

    def save(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Save everything registered as checkpoint `step`; with async_save only staging blocks."""
        if self._before_save is not None:
            self._before_save()
        self.wait()  # at most one save in flight; its failure surfaces here
        t0 = time.perf_counter()
        snap = self._snapshot(step, metrics or {})
        snap.timings["stage_s"] = time.perf_counter() - t0
        if self.background is None:
            self._write(snap)
        else:
            self.background.submit(step, functools.partial(self._write, snap))
        self._saved_step, self._saved_time = step, self._clock()

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight (if any) is committed and the retention after it is
        done (on the leader, upkeep.py); raise the save's error if it failed."""
        try:
            return self.background.wait() if self.background is not None else None
        finally:
            if self._tiered is None:  # with tiers, retention runs on the upload thread
                self._committer.wait()

    def close(self) -> None:
        """Commit the save in flight, then stop the background threads."""
        try:
            self.wait()
            if self._tiered is not None:
                self._tiered.close()  # the final upload, with its retries
        finally:
            if self.background is not None:
                self.background.close()
            self._committer.close()

    @property
    def _group(self) -> Group:
        """What saves and restores talk on: the background saver's group, or the default."""
        return self.background.group if self.background is not None else None

    def _snapshot(self, step: int, metrics: Mapping[str, float]) -> Snapshot:
        shared: dict[str, Any] = {}
        mine: dict[str, Any] = {}
        for name, (obj, per_rank) in self._entries.items():
            (mine if per_rank else shared)[name] = obj.state_dict()
        lazy = None
        if self.background is not None:  # training goes on while the save is written
            shared, lazy = self.background.detach(shared)
        blob = encode_rank_state(mine) if mine else None
        metric_values = {k: float(v) for k, v in metrics.items()}
        return Snapshot(step, metric_values, shared, blob, lazy=lazy)

    def _write(self, snap: Snapshot) -> CheckpointInfo:
        group = self._group
        t0 = time.perf_counter()
        if self._tiered is not None:
            info = self._tiered.write(snap, group, self._write_rank_state)
            self.last_save_s = snap.timings["stage_s"] + time.perf_counter() - t0
            return info
        attempt = dist.leader_decides(lambda: self._committer.prepare(snap.step), group)
        where = attempt.or_raise(CheckpointError, f"step {snap.step} not saved: ")
        try:
            records = save_shards(snap.shared, self.store, where.write_rel, group, snap.lazy)
        finally:
            if snap.lazy is not None:
                snap.lazy.done()
        local = self._write_rank_state(self.store, where.write_rel, snap.per_rank)
        gathered = dist.gather_objects((records, local), dst=dist.LEADER, group=group)
        snap.timings["write_s"] = time.perf_counter() - t0
        committed = dist.leader_decides(lambda: self._commit(where, snap, gathered), group)
        info = committed.or_raise(CheckpointError, f"step {snap.step} not committed: ")
        self.last_save_s = snap.timings["stage_s"] + time.perf_counter() - t0
        return info

    @staticmethod
    def _write_rank_state(
        store: Store, rel: str, blob: bytes | None
    ) -> tuple[dict[str, FileEntry], str | None]:
        if blob is None:
            return {}, None
        name = rank_state_name(dist.rank())
        try:
            store.write_bytes(f"{rel}/{name}", blob)
        except Exception as exc:  # reported through the gather: a raise here would hang the others
            return {}, f"rank {dist.rank()}: {one_line(exc)}"
        return {name: hash_bytes(blob)}, None

    def _commit(self, attempt: Attempt, snap: Snapshot, gathered: Any) -> CheckpointInfo:
        """On the leader; the retention pass after it spares the save in flight."""
        info = self._committer.commit(attempt, snap, gathered)
        in_flight = self.background.in_flight_step if self.background is not None else None
        self._committer.start_retention(protected=() if in_flight is None else (in_flight,))
        return info

    # -- restoring ------------------------------------------------------------------------

    def restore(self, step: int | None = None) -> CheckpointInfo | None:
        """Load the newest committed checkpoint that verifies (or exactly `step`) into everything
        registered. A checkpoint that fails verification is reported and the previous one used
        (restoring.py: the newest is checked while it loads, so it is read once).
        Returns what was loaded, or None if nothing is committed; raises CheckpointCorrupt
        when committed checkpoints exist and none verifies."""
        if self._tiered is not None:
            return self._restore_tiered(step)
        listed = dist.leader_decides(lambda: restoring.candidates(self.store, step), self._group)
        infos = listed.or_raise(CheckpointCorrupt)  # newest first
        shared = {
            name: obj.state_dict()
            for name, (obj, per_rank) in self._entries.items()
            if not per_rank
        }

        absent: list[str] = []

        def load(info: CheckpointInfo, tap: Tap | None) -> None:
            absent[:] = self._absent(info, shared)
            present = {k: v for k, v in shared.items() if k not in absent}
            load_shards(present, self.store, info.data_rel, self._group, tap=tap)

        info = restoring.newest_loaded(
            self.store, infos, load if shared else None, self._group,
            checksums=self.config.verify_checksums, exact=step is not None,
        )  # fmt: skip
        if info is None:
            return None
        for name, state in shared.items():
            obj = self._entries[name][0]
            if name in absent:
                obj.not_in_checkpoint(info.step)  # type: ignore[attr-defined]
            else:
                obj.load_state_dict(state)
        self._restore_rank_state(info)
        self._saved_step, self._saved_time = info.step, self._clock()
        log.info("restored %s (step %d)", self.store.path(info.rel), info.step, extra=LEADER_ONLY)
        return info

    def _restore_tiered(self, step: int | None) -> CheckpointInfo | None:
        """restore() with tiers (tiered_restore.py): each file from the fastest good copy."""
        assert self._tiered is not None
        shared = {
            n: obj.state_dict() for n, (obj, per_rank) in self._entries.items() if not per_rank
        }
        optional = [n for n in shared if hasattr(self._entries[n][0], "not_in_checkpoint")]
        done = self._tiered.restore(shared, optional, step, self._group)
        if done is None:
            return None
        for name, state in shared.items():
            obj = self._entries[name][0]
            if name in done.absent:
                obj.not_in_checkpoint(done.info.step)  # type: ignore[attr-defined]
            else:
                obj.load_state_dict(state)
        if done.rank_state is not None:
            state = decode_rank_state(done.rank_state)
            for key, (obj, per_rank) in self._entries.items():
                if per_rank and key in state:
                    obj.load_state_dict(state[key])
        self._saved_step, self._saved_time = done.info.step, self._clock()
        log.info(
            "restored step %d from the %s tier (%s)",
            done.info.step,
            done.tier,
            self._tiered.tier.store.path() if done.tier == "local" else self.store.path(),
            extra=LEADER_ONLY,
        )
        return done.info

    def _absent(self, info: CheckpointInfo, shared: Mapping[str, Any]) -> list[str]:
        """The registered states that may be missing (they have `not_in_checkpoint`, as an
        EMA added since the checkpoint was saved) and that `info` holds no key of. Every rank
        reads the same `.metadata`, so all agree; without such states nothing is read."""
        optional = [n for n in shared if hasattr(self._entries[n][0], "not_in_checkpoint")]
        if not optional:
            return []
        keys = stored_items(self.store, info.data_rel)
        return [n for n in optional if not any(k.startswith(n + ".") for k in keys)]

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
        state = decode_rank_state(self.store.read_bytes(f"{info.rel}/{name}"))
        for key in per_rank:
            if key in state:
                self._entries[key][0].load_state_dict(state[key])
