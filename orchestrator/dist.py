"""The process group and its collectives: the only module that calls torch.distributed directly.

Everything here works in a single process without a process group too (world size 1), so the
checkpoint engine and the tools (`stockpot export`, `verify`) run the same code with no group.
"""

from __future__ import annotations

import datetime
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
Group = Any  # torch.distributed.ProcessGroup | None (None: the default group)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group: Group = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group: Group = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def init(
    backend: str,
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    timeout_s: float = 600.0,
) -> None:
    """Join the default group through a TCP rendezvous at master_addr:master_port."""
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def new_gloo_group() -> Group:
    """A separate gloo group (collective: every rank calls it, in the same order).

    Background checkpoint I/O needs its own group: sharing the default one with training
    collectives aborts gloo ("Received data size doesn't match expected size") or hangs.
    """
    return dist.new_group(backend="gloo") if is_initialized() else None


def barrier(group: Group = None) -> None:
    if is_initialized():
        dist.barrier(group=group)


def broadcast_object(obj: T, src: int = 0, group: Group = None) -> T:
    """`obj` as held by global rank `src`, on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(obj: T, dst: int = 0, group: Group = None) -> list[T] | None:
    """Every rank's `obj`, in rank order, on `dst`; None elsewhere."""
    if not is_initialized():
        return [obj]
    out: list[Any] | None = [None] * world_size(group) if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def all_gather_objects(obj: T, group: Group = None) -> list[T]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def agree(flag: bool, group: Group = None) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. "stop: preempted")."""
    if not is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


class PendingAgreement:
    """`agree(flag)` posted now and answered later, so the reduction overlaps a training step
    instead of stalling every rank at the step boundary."""

    def __init__(self, flag: bool, group: Group = None) -> None:
        self._flag = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._work = (
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=group, async_op=True)
            if is_initialized()
            else None
        )

    def result(self) -> bool:
        if self._work is not None:
            self._work.wait()
        return bool(self._flag.item())


def all_reduce_sum(values: list[float], group: Group = None) -> list[float]:
    """Element-wise sum over ranks, in float64 (metrics; identical on every rank)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()
