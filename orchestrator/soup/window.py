"""The soup's reads, performed ahead of the mixer in a bounded window of parallel requests."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from orchestrator.soup.reader import Source
from orchestrator.soup.segments import Read


@dataclass
class Stats:
    bytes_read: int = 0
    pieces: int = 0
    read_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.pieces += 1
            self.read_s += seconds


class Window:
    """Performs `reads` in order with up to `workers` in flight and at most `ahead` bytes
    requested but not yet consumed (one read always allowed, however big).

    Reads land in reused buffers of `slot` bytes (a fresh buffer per read costs its page
    faults: ~6x slower than the copy itself once big allocations are mmapped); the consumer
    hands each one back with `release` when done with it."""

    def __init__(self, sources: Sequence[Source], reads: Iterator[Read], pool: ThreadPoolExecutor,
                 workers: int, ahead: int, slot: int, stats: Stats) -> None:  # fmt: skip
        self.sources, self.reads, self.pool = sources, reads, pool
        self.ahead, self.stats, self.workers, self.slot = ahead, stats, workers, slot
        self.inflight: deque[tuple[Read, Future[memoryview]]] = deque()
        self.inflight_bytes = 0
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._next: Read | None = next(self.reads, None)

    def _read(self, r: Read) -> memoryview:
        t0 = time.perf_counter()
        buf = None
        if r.length <= self.slot:
            with self._lock:
                buf = self._free.pop() if self._free else None
        if buf is None:
            buf = bytearray(max(r.length, self.slot))
        into = memoryview(buf)[: r.length]
        self.sources[r.source].read_into(r.file, r.start, into)
        self.stats.add(r.length, time.perf_counter() - t0)
        return into

    def release(self, data: memoryview) -> None:
        """`data` (from `take`) is no longer used: its buffer serves a later read."""
        buf = data.obj
        if isinstance(buf, bytearray) and len(buf) == self.slot:
            with self._lock:
                self._free.append(buf)

    def _fill(self) -> None:
        while self._next is not None and len(self.inflight) < self.workers:
            size = self._next.length
            if self.inflight and self.inflight_bytes + size > self.ahead:
                return
            r, self._next = self._next, next(self.reads, None)
            self.inflight.append((r, self.pool.submit(self._read, r)))
            self.inflight_bytes += size

    def take(self) -> tuple[Read, memoryview]:
        self._fill()
        if not self.inflight:
            raise RuntimeError("soup reader: asked for more pieces than planned")
        r, future = self.inflight.popleft()
        data = future.result()
        self.inflight_bytes -= r.length
        self._fill()
        return r, data

    def close(self) -> None:
        for _, future in self.inflight:
            future.cancel()
