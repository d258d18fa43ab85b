"""The async half of the Checkpointer: one save at a time written on a thread of its own while
training goes on.

A save's shared state is detached from training first (`detach`): objects that say before
their tensors change (`before_change`, `guard`) are written from live memory and copied only
when about to change (snapshot.LazyCopy); the rest are copied up front into the previous save's
buffers (snapshot.stage). The write then runs on one low-priority thread (`submit`), talking on
its own gloo group: sharing the default one with training collectives breaks gloo (dist.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from orchestrator import dist
from orchestrator.checkpoint import snapshot
from orchestrator.checkpoint.catalog import CheckpointInfo
from orchestrator.checkpoint.snapshot import Key, LazyCopy, live_tensors, stage, tensor_key
from orchestrator.checkpoint.stateful import Handle, Stateful
from orchestrator.dist import one_line
from orchestrator.errors import CheckpointError, StockpotError


class BackgroundSaver:
    """Created by every rank alike (it creates a gloo group, a collective); `close()` ends it."""

    def __init__(self) -> None:
        self.group = dist.new_gloo_group()
        self._executor = ThreadPoolExecutor(
            1, "stockpot-ckpt", initializer=snapshot.yield_to_training
        )
        self._in_flight: Future[CheckpointInfo] | None = None
        self._in_flight_step: int | None = None
        self._staging: Any = None  # host copy of the last save's unguarded state, reused
        self._guards: dict[str, Handle] = {}
        self._lazy: LazyCopy | None = None  # of the newest save
        self._pool: dict[Key, torch.Tensor] = {}  # LazyCopy's buffers, reused save to save

    @property
    def in_flight_step(self) -> int | None:
        """The step being written, from `submit` until `wait` (or `close`) collects it."""
        return self._in_flight_step

    @property
    def lazy_copy(self) -> LazyCopy | None:
        """The newest save's LazyCopy (how much it copied); None when nothing was guarded."""
        return self._lazy

    @property
    def staged(self) -> dict[str, Any]:
        """The newest save's copy made up front: the state of the objects without a guard."""
        return self._staging if self._staging is not None else {}

    @property
    def copy_buffer_bytes(self) -> int:
        """Memory held for lazy copies (0: every save was written before its state changed)."""
        return sum(t.nbytes for t in self._pool.values())

    def copy_buffer(self, t: torch.Tensor) -> torch.Tensor | None:
        """The buffer that a lazy copy of the live tensor `t` was made in (and the next save's
        copy of it reuses); None while none was needed."""
        return self._pool.get(tensor_key(t))

    def guard(self, name: str, obj: Stateful) -> None:
        """Write `obj` (registered as shared state `name`) from live memory when it says before
        its tensors change; without `before_change` (or a handle from it), it is staged."""
        before_change = getattr(obj, "before_change", None)
        handle = before_change(self._freeze) if before_change is not None else None
        if handle is not None:
            self._guards[name] = handle

    def detach(self, shared: dict[str, Any]) -> tuple[dict[str, Any], LazyCopy | None]:
        """`shared` (name -> state_dict) as the save writes it while training changes the live
        state: staged copies, and guarded state left live under a new LazyCopy."""
        eager = {k: v for k, v in shared.items() if k not in self._guards}
        self._staging = stage(eager, self._staging)
        found: list[torch.Tensor] = []
        guarded = {k: live_tensors(v, found) for k, v in shared.items() if k in self._guards}
        lazy = self._lazy = LazyCopy(found, self._pool) if found else None
        return {**self._staging, **guarded}, lazy

    def submit(self, step: int, write: Callable[[], CheckpointInfo]) -> None:
        """Run `write` (the save of `step`) on the background thread; one in flight at a time:
        `wait()` for the one before first."""
        assert self._in_flight is None, "wait() for the save in flight before the next"
        self._in_flight_step = step
        self._in_flight = self._executor.submit(self._write_guarded, step, write)

    def wait(self) -> CheckpointInfo | None:
        """The committed save in flight (None if none); raises its error if it failed."""
        future, self._in_flight, self._in_flight_step = self._in_flight, None, None
        return future.result() if future is not None else None

    def close(self) -> None:
        """Stop the thread (after the save in flight) and remove the guards."""
        self._executor.shutdown(wait=True)
        for handle in self._guards.values():
            handle.remove()
        self._guards.clear()

    def _freeze(self) -> None:
        """A guarded object is about to change its tensors: what the save in flight has not
        written yet is copied now (on the training thread; the writer waits for nothing)."""
        lazy = self._lazy
        if lazy is not None:
            lazy.freeze()

    @staticmethod
    def _write_guarded(step: int, write: Callable[[], CheckpointInfo]) -> CheckpointInfo:
        try:
            return write()
        except BaseException as exc:  # even another rank's interrupt: training must hear of it
            if isinstance(exc, StockpotError):
                raise
            raise CheckpointError(
                f"background save of step {step} failed: {one_line(exc)}"
            ) from exc
