"""The process group and its collectives: the only module that calls torch.distributed directly.

Everything here works in a single process without a process group too (world size 1), so the
checkpoint engine and the tools (`stockpot export`, `verify`) run the same code with no group.
"""

from __future__ import annotations

import datetime
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import torch
import torch.distributed as dist

from orchestrator.errors import one_line  # re-exported: where ranks' problems are told

T = TypeVar("T")
LEADER = 0  # global rank that decides for everyone (commits, chooses what to restore)
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
    """Join the default group through a TCP rendezvous at master_addr:master_port (rank 0
    serves it)."""
    if rank != LEADER:
        _wait_for_listener(master_addr, master_port, timeout_s)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _wait_for_listener(addr: str, port: int, timeout_s: float) -> None:
    """Return once something listens at addr:port (rank 0's store), or at the timeout. torch's
    client backs off ~0.4 s after a refused connect, so a rank that starts a few ms before
    rank 0 (the usual race when all start together) lost that much; plain connects retried
    every few ms do not. At the timeout, init_process_group fails as it would have."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((addr, port), timeout=1.0).close()
            return
        except (ConnectionRefusedError, TimeoutError):  # not listening yet
            time.sleep(0.005)
        except OSError:  # a name that does not resolve, no route: torch says it its own way
            return


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
    instead of stalling every rank at the step boundary. It also agrees on `every` (the
    smallest of the ranks' proposals), so all ranks can schedule the next one alike."""

    def __init__(self, flag: bool, group: Group = None, every: int = 1) -> None:
        # MAX of [flag, -every]: any rank's flag, and the smallest proposal
        self._t = torch.tensor([1 if flag else 0, -max(1, every)], dtype=torch.int64)
        self._work = (
            dist.all_reduce(self._t, op=dist.ReduceOp.MAX, group=group, async_op=True)
            if is_initialized()
            else None
        )

    def result(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return bool(self._t[0].item())

    @property
    def every(self) -> int:
        """The agreed proposal (call after `result`)."""
        return max(1, -int(self._t[1].item()))


def all_reduce_sum(values: list[float], group: Group = None) -> list[float]:
    """Element-wise sum over ranks, in float64 (metrics; identical on every rank)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0, group: Group = None) -> None:
    """Overwrite `tensors` in place with `src`'s values: one broadcast per dtype (BatchNorm
    buffers are many small float tensors and an int64 counter each)."""
    if not is_initialized() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        dist.broadcast(flat, src=src, group=group)
        with torch.no_grad():
            for t, part in zip(same, flat.split([t.numel() for t in same]), strict=True):
                t.copy_(part.view_as(t))


@dataclass(frozen=True)
class Decision(Generic[T]):
    """What the leader decided, as every rank receives it: a value, or why there is none."""

    value: T
    problem: str | None = None  # one line; set when the leader's decision raised

    def or_raise(self, error: Callable[[str], BaseException], context: str = "") -> T:
        """The value, or `error(context + problem)`: raised on every rank alike, so no rank
        goes on to a collective that the others will never join."""
        if self.problem is not None:
            raise error(f"{context}{self.problem}")
        return self.value


def leader_decides(decide: Callable[[], T], group: Group = None) -> Decision[T]:
    """Run `decide` on the leader only and broadcast its result (collective: every rank calls
    it). An exception there becomes `Decision.problem` instead of leaving the other ranks
    waiting in the broadcast for a value that never comes."""
    decision: Decision[Any] | None = None
    if rank() == LEADER:
        try:
            decision = Decision(decide())
        except Exception as exc:
            decision = Decision(None, one_line(exc))
    return cast(Decision[T], broadcast_object(decision, src=LEADER, group=group))


# What gloo says when a peer died, left, or stopped answering for longer than the group's timeout.
_PEER_LOST = (
    "Timed out waiting",
    "Connection closed by peer",
    "Connection reset by peer",
    "Application timeout caused pair closure",  # DDP's backward allreduce, past the timeout
)


def lost_peer(exc: BaseException) -> str | None:
    """One line for a collective that failed because of another rank, else None. With two
    ranks the culprit is known: the other one."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(exc).split()))  # gloo's source location
    if not is_initialized() or not any(m in text for m in _PEER_LOST):
        return None
    me, n = rank(), world_size()
    who = f"rank {1 - me}" if n == 2 else "another rank"
    return (
        f"rank {me}: a collective failed: {who} died, left or hung past "
        f"trainer.collective_timeout_s ({text[:200]})"
    )
