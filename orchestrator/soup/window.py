"""The soup's reads, performed ahead of the mixer in a bounded window of parallel requests."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from orchestrator.soup.reader import Source
from orchestrator.soup.segments import Read


@dataclass
class Stats:
    bytes_read: int = 0
    pieces: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0  # the consumer's time waiting for reads (and their checksums)
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
    hands each one back with `release` when done with it.

    `feed` (the checksums) sees every read's bytes in plan order, on the read threads rather
    than the consumer's: whichever thread finds the next read in order done feeds it, and
    those after it that are done too (xxhash releases the GIL, so hashing overlaps the mix).
    `take` returns a read once it is fed."""

    def __init__(self, sources: Sequence[Source], reads: Iterator[Read], pool: ThreadPoolExecutor,
                 workers: int, ahead: int, slot: int, stats: Stats,
                 feed: Callable[[Read, memoryview], None] | None = None) -> None:  # fmt: skip
        self.sources, self.reads, self.pool = sources, reads, pool
        self.ahead, self.stats, self.workers, self.slot = ahead, stats, workers, slot
        self.inflight: deque[tuple[Read, Future[memoryview], threading.Event]] = deque()
        self.inflight_bytes = 0
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._next: Read | None = next(self.reads, None)
        self._feed = feed
        self._submitted = self._fed = 0  # reads in plan order: submitted, fed so far
        self._done: dict[int, tuple[Read, memoryview | None, threading.Event]] = {}
        self._feeding = False
        self._error: Exception | None = None

    def _read_and_feed(self, seq: int, r: Read, fed: threading.Event) -> memoryview:
        data = None
        try:
            data = self._read(r)
            return data
        finally:  # a failed read is passed over (its error reaches the consumer)
            with self._lock:
                self._done[seq] = (r, data, fed)
                drain, self._feeding = not self._feeding, True
            if drain:
                self._drain()

    def _drain(self) -> None:
        """Feed the done reads that come next in plan order; one thread at a time."""
        while True:
            with self._lock:
                item = self._done.pop(self._fed, None)
                if item is None:
                    self._feeding = False
                    return
                self._fed += 1
            r, data, fed = item
            try:
                if data is not None and self._feed is not None and self._error is None:
                    self._feed(r, data)
            except Exception as exc:  # a gap read failed: `take` raises it
                self._error = exc
            finally:
                fed.set()

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
            fed = threading.Event()
            self.inflight.append((r, self.pool.submit(self._read_and_feed, self._submitted, r, fed),
                                  fed))  # fmt: skip
            self._submitted += 1
            self.inflight_bytes += size

    def take(self) -> tuple[Read, memoryview]:
        self._fill()
        if not self.inflight:
            raise RuntimeError("soup reader: asked for more pieces than planned")
        r, future, fed = self.inflight.popleft()
        t0 = time.perf_counter()
        data = future.result()
        fed.wait()
        self.stats.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        self.inflight_bytes -= r.length
        self._fill()
        return r, data

    def close(self) -> None:
        for _, future, _ in self.inflight:
            future.cancel()
