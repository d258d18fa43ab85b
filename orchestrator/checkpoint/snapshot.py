"""What a save writes: the state taken at its step (`Snapshot`); for a background save, which
goes on while training does, copies of it made up front, or made lazily.

`stage` copies every tensor into host buffers before the save call returns (the previous save's
buffers, reused). It is always right, and it costs a memory copy of the whole state inside the
training stall (~0.1 s/GB here).

`LazyCopy` copies nothing up front. The writer reads the live tensors for as long as they stay
unchanged; their owner calls `freeze()` before they next change (`ModelAndOptimizer` does it
from the optimizer's step pre-hook: parameters and optimizer state change only in `step()`).
`freeze()` copies what is not written yet, waits for the tensors being written at that moment,
and the writer carries on from the copies. The training stall is then `state_dict()` alone;
the copy, of only what is left, moves to the next optimizer step, and is often nothing at all.

Tensors are known by their memory (storage address, offset, shape, strides, dtype), so a
tensor the writer gets from DCP's planner (a DTensor's local shard, a detached alias) is found.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

Key = tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]
BACKGROUND_NICE = 10  # the background writer's nice value, relative to training's


@dataclass
class Snapshot:
    """One save's state, taken on the training thread at `step`."""

    step: int
    metrics: dict[str, float]
    shared: dict[str, Any]  # DCP state: sharded or replicated tensors and small objects
    per_rank: bytes | None  # this rank's JSON blob
    timings: dict[str, float] = field(default_factory=dict)
    lazy: LazyCopy | None = None  # the live tensors in `shared`, copied before they change


def yield_to_training() -> None:
    """Run the calling thread (a background writer; the threads it starts inherit it) at a
    lower priority: where training keeps every core busy, steps keep their pace and the save
    takes the CPU time left over. On a saturated machine the background write then takes
    longer: the two pull against each other, and training is favoured (figures:
    bench/README.md, "Step time during a background save")."""
    with contextlib.suppress(OSError):  # not permitted: it runs at training's level
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def tensor_key(t: torch.Tensor) -> Key:
    return (
        t.untyped_storage().data_ptr(),
        int(t.storage_offset()),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def stage(value: Any, buffer: Any) -> Any:
    """A copy of `value` detached from training, written into the previous save's buffers when
    they fit (same structure, shapes, dtypes): reusing them skips allocating and faulting in
    the whole state again, which is most of the staging time. The previous save is finished
    (at most one in flight), so its buffers are free."""
    if isinstance(value, torch.Tensor):
        return _copy(value.detach(), buffer)
    if isinstance(value, dict):
        fields = buffer if isinstance(buffer, dict) else {}
        return {k: stage(v, fields.get(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        same = isinstance(buffer, list | tuple) and len(buffer) == len(value)
        items = buffer if same else [None] * len(value)
        return type(value)(stage(v, b) for v, b in zip(value, items, strict=True))
    return copy.deepcopy(value)


def _copy(value: torch.Tensor, buffer: Any) -> torch.Tensor:
    fits = (
        type(buffer) is type(value)
        and buffer.shape == value.shape
        and buffer.dtype == value.dtype
        and buffer.device == value.device
        and buffer.stride() == value.stride()
    )
    return buffer.copy_(value) if fits else value.clone()


def live_tensors(value: Any, found: list[torch.Tensor]) -> Any:
    """`value` with its tensors left live (appended to `found`, a DTensor as its local shard)
    and everything else deep-copied: plain values (a learning rate in param_groups) are cheap,
    and a later change to them must not reach the save."""
    if isinstance(value, torch.Tensor):
        found.append((value.to_local() if isinstance(value, DTensor) else value).detach())
        return value
    if isinstance(value, dict):
        return {k: live_tensors(v, found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(live_tensors(v, found) for v in value)
    return copy.deepcopy(value)


class LazyCopy:
    """The live tensors of one background save, copied only when they are about to change.

    The writer threads call `take(t)` for each tensor they write (the copy, if one was made)
    and `release()` when done with a file; `expect(tensors)` says which tensors this rank
    writes (DCP gives each replicated tensor to one rank): the shard writer's
    `format.LazyTensors`. The owner's thread calls `freeze()` before the tensors change;
    `done()` once the save is over (`freeze()` is then a no-op)."""

    def __init__(self, tensors: Iterable[torch.Tensor], pool: dict[Key, torch.Tensor]) -> None:
        self._live = {tensor_key(t): t for t in tensors}
        # Buffers of earlier saves, reused (the same parameters have the same keys); those of
        # tensors gone since (fresh copies, a resized model) are let go.
        for gone in pool.keys() - self._live.keys():
            del pool[gone]
        self._pool = pool
        self._copies: dict[Key, torch.Tensor] = {}
        self._remaining: Counter[Key] | None = None  # None: not planned yet, any may be written
        self._taken: dict[int, Key] = {}  # writer thread -> the tensor it is writing
        self._over = False  # frozen or done: nothing is copied any more
        self._frozen = False
        self._cond = threading.Condition()
        self.copied_bytes = 0

    def expect(self, tensors: Iterable[torch.Tensor]) -> None:
        keys = (tensor_key(t) for t in tensors)
        with self._cond:
            self._remaining = Counter(k for k in keys if k in self._live)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        k = tensor_key(t)
        with self._cond:
            self._release_locked()
            if k in self._copies:
                return self._copies[k]
            if k in self._live:
                if self._frozen:  # an uncounted tensor: writing it now could tear the save
                    raise RuntimeError("a background save read a tensor after it was released")
                self._taken[threading.get_ident()] = k
                if self._remaining is not None:
                    self._remaining[k] -= 1
            return t

    def release(self) -> None:
        with self._cond:
            self._release_locked()

    def _release_locked(self) -> None:
        if self._taken.pop(threading.get_ident(), None) is not None:
            self._cond.notify_all()

    def freeze(self) -> None:
        """Copy what the writer has yet to read, then wait out what it is reading now."""
        with self._cond:
            if self._over:
                return
            self._over = self._frozen = True
            left = self._live if self._remaining is None else (
                {k: t for k, t in self._live.items() if self._remaining[k] > 0}
            )  # fmt: skip
            for k, t in left.items():
                if k not in self._copies:
                    self._copies[k] = self._pool[k] = _copy(t, self._pool.get(k))
                    self.copied_bytes += t.nbytes
            self._cond.wait_for(lambda: not self._taken)

    def done(self) -> None:
        """The writer is finished (or failed): nothing more is read, nothing needs copying."""
        with self._cond:
            self._over = True
            self._taken.clear()
            self._cond.notify_all()
