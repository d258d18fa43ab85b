"""The Checkpointer: register what must survive, `save(step)`, `restore()`; commit, async, retention.

Every rank calls the same methods in the same order. One rank (the leader, global rank 0) picks
where a checkpoint is written, commits it by writing MANIFEST.json last, applies retention and
collects garbage; the outcome is broadcast so every rank returns or raises alike.

    ckpt = Checkpointer(Store(run_dir), policy=RetentionPolicy(keep_last=3), async_save=True)
    ckpt.register("train", ModelAndOptimizer(model, optim))      # sharded through DCP
    ckpt.register("rng", RNGState(), per_rank=True)               # JSON, one file per rank
    ckpt.restore()                                                # newest checkpoint that verifies
    ckpt.save(step, metrics={"eval/loss": 0.3})
    ckpt.close()                                                  # waits for the save in flight
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from orchestrator import dist
from orchestrator.checkpoint import catalog, dcp_io, rank_state
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.layout import (
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    TMP_PREFIX,
    parse_step_dirname,
    rank_state_name,
    step_dirname,
    step_rel,
)
from orchestrator.checkpoint.manifest import FileEntry, Manifest, hash_bytes
from orchestrator.checkpoint.retention import (
    Candidate,
    RetentionPolicy,
    delete_checkpoints,
    plan_retention,
)
from orchestrator.errors import CheckpointCorrupt, StockpotError
from orchestrator.storage import Store

log = logging.getLogger(__name__)
LEADER = 0


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class _Hooks:
    """Adapts a pair of save/load functions to the Stateful protocol."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], None]) -> None:
        self._save, self._load = save, load

    def state_dict(self) -> Any:
        return self._save()

    def load_state_dict(self, state: Any) -> None:
        self._load(state)


class CheckpointError(StockpotError):
    """A save was not committed (the previous committed checkpoint is untouched)."""


@dataclass
class _Snapshot:
    step: int
    metrics: dict[str, float]
    shared: dict[str, Any]  # DCP state: sharded or replicated tensors and small objects
    per_rank: bytes | None  # this rank's JSON blob
    timings: dict[str, float] = field(default_factory=dict)


class Checkpointer:
    def __init__(
        self,
        run: Store,
        *,
        policy: RetentionPolicy | None = None,
        async_save: bool = False,
        verify_checksums: bool = True,
        parallel: str = "",
        config_hash: str = "",
    ) -> None:
        self.run = run
        self.policy = policy or RetentionPolicy()
        self.async_save = async_save
        self.verify_checksums = verify_checksums
        self.parallel, self.config_hash = parallel, config_hash
        self._entries: dict[str, tuple[Stateful, bool]] = {}
        self._is_leader = dist.rank() == LEADER
        # Background saves talk on their own gloo group (collective: created by every rank).
        self._group = dist.new_gloo_group() if async_save else None
        self._executor = ThreadPoolExecutor(1, "stockpot-ckpt") if async_save else None
        self._in_flight: Future[CheckpointInfo] | None = None
        self._in_flight_step: int | None = None
        self._staging: Any = None  # host copy of the last async save, reused by the next
        self._collected_garbage = False
        self.last_save_s: float | None = None

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
        self._entries[name] = (obj if obj is not None else _Hooks(save, load), per_rank)  # type: ignore[arg-type]

    # -- saving ---------------------------------------------------------------------------

    def save(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Save everything registered as checkpoint `step`; with async_save only staging blocks."""
        self.wait()  # at most one save in flight; its failure surfaces here
        t0 = time.perf_counter()
        snap = self._snapshot(step, metrics or {}, detach=self.async_save)
        snap.timings["stage_s"] = time.perf_counter() - t0
        if self._executor is None:
            self._write(snap)
            return
        self._in_flight_step = step
        self._in_flight = self._executor.submit(self._write_guarded, snap)

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        future, self._in_flight, self._in_flight_step = self._in_flight, None, None
        return future.result() if future is not None else None

    def close(self) -> None:
        """Commit the save in flight, then stop the background thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def _snapshot(self, step: int, metrics: Mapping[str, float], *, detach: bool) -> _Snapshot:
        shared: dict[str, Any] = {}
        mine: dict[str, Any] = {}
        for name, (obj, per_rank) in self._entries.items():
            (mine if per_rank else shared)[name] = obj.state_dict()
        if detach:  # live tensors keep training while the copy is written
            shared = self._staging = _stage(shared, self._staging)
        blob = rank_state.encode(mine) if mine else None
        return _Snapshot(step, {k: float(v) for k, v in metrics.items()}, shared, blob)

    def _write_guarded(self, snap: _Snapshot) -> CheckpointInfo:
        try:
            return self._write(snap)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if isinstance(exc, StockpotError):
                raise
            raise CheckpointError(
                f"background save of step {snap.step} failed: {_one_line(exc)}"
            ) from exc

    def _write(self, snap: _Snapshot) -> CheckpointInfo:
        group = self._group
        t0 = time.perf_counter()
        prepared = self._leader_prepare(snap.step) if self._is_leader else (None, "", None)
        rel, data_dir, problem = dist.broadcast_object(prepared, src=LEADER, group=group)
        if problem or rel is None:
            raise CheckpointError(f"step {snap.step} not saved: {problem}")
        data_rel = f"{rel}/{data_dir}" if data_dir else rel
        records = dcp_io.save_shards(snap.shared, self.run, data_rel, group)
        local = self._write_rank_state(data_rel, snap.per_rank)
        gathered = dist.gather_objects((records, local), dst=LEADER, group=group)
        snap.timings["write_s"] = time.perf_counter() - t0
        outcome = self._leader_commit(rel, data_dir, snap, gathered) if self._is_leader else None
        info, problem = dist.broadcast_object(outcome or (None, None), src=LEADER, group=group)
        if problem or info is None:
            raise CheckpointError(f"step {snap.step} not committed: {problem}")
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
            return {}, f"rank {dist.rank()}: {_one_line(exc)}"
        return {name: hash_bytes(blob)}, None

    # -- the leader's part ------------------------------------------------------------------

    def _leader_prepare(self, step: int) -> tuple[str | None, str, str | None]:
        """(where the ranks write, data sub-dir, problem): local disk writes a temp sibling that
        is renamed at commit; S3 writes under a fresh nonce inside the step prefix."""
        try:
            if not self._collected_garbage:
                self.collect_garbage()
                self._collected_garbage = True
            final = step_rel(step)
            if self.run.exists(f"{final}/{MANIFEST_NAME}"):
                return None, "", f"{self.run.path(final)} is already committed"
            nonce = uuid.uuid4().hex[:12]
            if self.run.is_s3:
                return final, nonce, None
            rel = f"{CHECKPOINTS_DIR}/{TMP_PREFIX}{step_dirname(step)}-{nonce}"
            self.run.makedirs(rel)
            return rel, "", None
        except Exception as exc:
            return None, "", _one_line(exc)

    def _leader_commit(
        self, rel: str, data_dir: str, snap: _Snapshot, gathered: Any
    ) -> tuple[CheckpointInfo | None, str | None]:
        try:
            errors = [err for _, (_, err) in gathered if err]
            if errors:
                return None, "; ".join(errors)
            files: dict[str, FileEntry] = {}
            for records, (local, _) in gathered:
                for name, entry in [*records.items(), *local.items()]:
                    files[f"{data_dir}/{name}" if data_dir else name] = entry
            info = self._commit(rel, data_dir, snap, files)
        except Exception as exc:
            return None, _one_line(exc)
        self._apply_retention()
        return info, None

    def _commit(
        self, rel: str, data_dir: str, snap: _Snapshot, files: dict[str, FileEntry]
    ) -> CheckpointInfo:
        t0 = time.perf_counter()
        final = step_rel(snap.step)
        timings = dict(snap.timings)
        manifest = Manifest(
            step=snap.step,
            files=files,
            world_size=dist.world_size(),
            parallel=self.parallel,
            config_hash=self.config_hash,
            metrics=snap.metrics,
            timings=timings,
            data_dir=data_dir,
        )
        if self.run.is_s3:
            try:  # create-only: two writers can never both commit one step
                self.run.write_bytes(
                    f"{final}/{MANIFEST_NAME}", manifest.to_json(), create_only=True
                )
            except FileExistsError:
                raise CheckpointError(
                    f"another writer committed {self.run.path(final)} first"
                ) from None
        else:
            self.run.fsync_tree(rel)
            self.run.write_bytes(f"{rel}/{MANIFEST_NAME}", manifest.to_json())
            self.run.rename_dir(rel, final)
        timings["commit_s"] = time.perf_counter() - t0
        log.info(
            "committed %s (%.1f MB, %s)",
            self.run.path(final),
            manifest.total_bytes / 1e6,
            ", ".join(f"{k} {v:.3f}" for k, v in timings.items()),
        )
        return CheckpointInfo(snap.step, final, manifest)

    def _apply_retention(self) -> None:
        try:
            committed = catalog.scan(self.run).committed
            in_flight = self._in_flight_step
            doomed = plan_retention(
                [Candidate(c.step, c.metrics) for c in committed],
                self.policy,
                protected=() if in_flight is None else (in_flight,),
            )
            delete_checkpoints(self.run, doomed, log=log)
        except Exception as exc:  # retention must never fail a save; next save plans again
            log.warning("retention skipped this time: %s", _one_line(exc))

    def collect_garbage(self) -> list[str]:
        """Remove temp dirs, uncommitted step dirs older than the newest commit, stale attempts
        inside committed S3 steps and unfinished multipart uploads. The leader calls this once,
        before its first save."""
        found = catalog.scan(self.run)
        latest = found.latest()
        newest = latest.step if latest else -1
        doomed = [
            rel
            for rel in found.leftovers
            if rel.split("/")[-1].startswith(TMP_PREFIX)
            or (parse_step_dirname(rel.split("/")[-1]) or newest + 1) < newest
        ]
        for info in found.committed if self.run.is_s3 else []:
            keep = {MANIFEST_NAME, info.manifest.data_dir}
            doomed += [f"{info.rel}/{name}" for name in self.run.list(info.rel) if name not in keep]
        for rel in doomed:
            try:
                self.run.delete(rel, recursive=True)
            except Exception as exc:
                log.warning("could not remove leftover %s: %s", self.run.path(rel), _one_line(exc))
        aborted = self.run.abort_multipart_uploads(CHECKPOINTS_DIR)
        if doomed or aborted:
            log.info(
                "garbage collected: %d leftover dirs, %d multipart uploads", len(doomed), aborted
            )
        return doomed

    # -- restoring ------------------------------------------------------------------------

    def restore(self, step: int | None = None) -> CheckpointInfo | None:
        """Load the newest committed checkpoint that verifies (or exactly `step`) into everything
        registered. A checkpoint that fails verification is reported and the previous one used.
        Returns what was loaded, or None if there is nothing to resume from."""
        info, problem = dist.broadcast_object(
            self._leader_choose(step) if self._is_leader else (None, None),
            src=LEADER,
            group=self._group,
        )
        if problem:
            raise CheckpointCorrupt(problem)
        if info is None:
            return None
        shared = {
            name: obj.state_dict()
            for name, (obj, per_rank) in self._entries.items()
            if not per_rank
        }
        if shared:
            dcp_io.load_shards(shared, self.run, info.data_rel, self._group)
            for name, state in shared.items():
                self._entries[name][0].load_state_dict(state)
        self._restore_rank_state(info)
        log.info("restored %s (step %d)", self.run.path(info.rel), info.step)
        return info

    def _leader_choose(self, step: int | None) -> tuple[CheckpointInfo | None, str | None]:
        try:
            committed = catalog.scan(self.run).committed
            if step is not None:
                committed = [c for c in committed if c.step == step]
                if not committed:
                    return None, f"no committed checkpoint at step {step} in {self.run.path()}"
                problems = catalog.verify(
                    self.run.child(committed[0].rel),
                    committed[0].manifest,
                    checksums=self.verify_checksums,
                )
                return (None, "; ".join(problems)) if problems else (committed[0], None)
            return catalog.newest_good(self.run, committed, checksums=self.verify_checksums), None
        except Exception as exc:
            return None, _one_line(exc)

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
        state = rank_state.decode(self.run.read_bytes(f"{info.rel}/{name}"))
        for key in per_rank:
            if key in state:
                self._entries[key][0].load_state_dict(state[key])


def _stage(value: Any, buffer: Any) -> Any:
    """A copy of `value` detached from training, written into the previous save's buffers when
    they fit (same structure, shapes, dtypes): reusing them skips allocating and faulting in
    the whole state again, which is most of the staging time. The previous save is finished
    (at most one in flight), so its buffers are free."""
    if isinstance(value, torch.Tensor):
        fits = (
            type(buffer) is type(value)
            and buffer.shape == value.shape
            and buffer.dtype == value.dtype
            and buffer.device == value.device
        )
        return buffer.copy_(value.detach()) if fits else value.detach().clone()
    if isinstance(value, dict):
        fields = buffer if isinstance(buffer, dict) else {}
        return {k: _stage(v, fields.get(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        same = isinstance(buffer, list | tuple) and len(buffer) == len(value)
        items = buffer if same else [None] * len(value)
        return type(value)(_stage(v, b) for v, b in zip(value, items, strict=True))
    return copy.deepcopy(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__
