"""The streaming mixer: a weighted mean of N ingredients, one tensor at a time.

For each output tensor, in the order the writer asks for them, the pieces of that tensor are
read from every ingredient (a bounded window of parallel reads ahead of the consumer) and
added into one accumulator, float64 for float32/float64 inputs and float32 for 16-bit ones,
which is cast to the input dtype once at the end. Memory is the accumulator, the output
tensor and the read-ahead window: independent of N and of the model's total size.

Integer and bool tensors (`num_batches_tracked`, masks, index buffers) are not averaged: they
are copied from the first ingredient, and only its pieces are read. Ties: two names whose
tensors are bitwise equal in every ingredient (GPT-2's `lm_head.weight` and
`transformer.wte.weight`) get bitwise equal outputs (identical inputs, identical arithmetic)
and are reported in `ties`, so the writer can say so and a model that ties them re-ties them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xxhash

from orchestrator.errors import UsageError
from orchestrator.soup.reader import Piece, Source, TensorSpec, same_layout

MIN_AHEAD = 512 << 10
MAX_AHEAD = 256 << 20


def keep_big_allocations_mapped() -> None:
    """Pin glibc's mmap threshold at its default 128 kB (process-wide; a no-op elsewhere).

    glibc raises the threshold after each large free (up to 32 MB), after which MB-sized
    pieces and accumulators come from malloc heaps and arenas that are not given back: a soup
    then holds tens of MB more than its working set. Fixed, every tensor-sized buffer is its
    own mapping, returned to the system when freed.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(128 * 1024))
    except OSError:
        pass


_M_MMAP_THRESHOLD = -3  # glibc malloc.h


class SingleThreaded:
    """torch's intra-op threads set to 1 until `restore()`. The mix is a stream of MB-sized
    adds: OpenMP's parallel regions save little there and, on a busy shared node, each one
    waits for every thread to be scheduled (measured: 10x slower under load)."""

    def __init__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def restore(self) -> None:
        torch.set_num_threads(self.before)


def warm_up(specs: Mapping[str, TensorSpec]) -> None:
    """Run each kernel the mix uses once, on small tensors of the dtypes present.

    The first call of a torch kernel faults its code pages in (~15-20 MB of libtorch for the
    type-promoting add alone): a constant of the interpreter, not of the soup. Doing it before
    the start RSS is taken keeps the memory figures about the soup's data.
    """
    import io

    for dtype in {spec.dtype for spec in specs.values()}:
        x = torch.zeros(1 << 16, dtype=dtype)
        buf = io.BytesIO()
        torch.save(x, buf)
        x = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        xxhash.xxh3_64(x.view(torch.uint8).numpy())
        if dtype.is_floating_point:
            acc = torch.zeros(
                1 << 16, dtype=torch.float64 if dtype.itemsize >= 4 else torch.float32
            )
            acc.add_(x)
            acc.add_(x, alpha=0.5)
            acc.div_(2)
            float(torch.dot(x.float(), x.float()))
            acc.to(dtype)


def check_layout(sources: Sequence[Source]) -> dict[str, TensorSpec]:
    """The common tensor specs; UsageError naming the first mismatch and both ingredients."""
    first = sources[0]
    for other in sources[1:]:
        reason = same_layout(first.specs, other.specs)
        if reason:
            raise UsageError(
                f"ingredients differ: {reason} "
                f"(first: {first.ingredient.url}, second: {other.ingredient.url})"
            )
    return dict(first.specs)


def normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UsageError(f"--weights has {len(weights)} values for {n} ingredients")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(f"--weights must be >= 0 and not all 0 (got {list(weights)})")
    total = float(sum(weights))
    return [w / total for w in weights]


def default_ahead(model_bytes: int, largest_piece: int) -> int:
    """Read-ahead budget: ~1/128 of one model, within [0.5 MB, 256 MB], never below one piece."""
    return max(largest_piece, min(MAX_AHEAD, max(MIN_AHEAD, model_bytes // 128)))


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


class Similarity:
    """How alike the ingredients' weight matrices are, with no copy of any of them: the mean
    pairwise cosine c implied by the norm of their weighted mean m = sum_i w_i x_i. With
    (weighted) mean squared norm n2 = sum_i w_i |x_i|^2 and s = sum_i w_i^2,
    |m|^2 = n2 (s + c (1 - s)) for equal norms, so c = (|m|^2 / n2 - s) / (1 - s).
    Fine-tunes of one model: c near 1; independently initialised models are near-orthogonal,
    c near 0, and their soup collapses."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = list(weights)
        self.norms = 0.0  # sum_i w_i |x_i|^2 over every matrix
        self.mean_norm = 0.0  # |m|^2 over every matrix

    def add_piece(self, i: int, piece: torch.Tensor) -> None:
        x = piece.reshape(-1).float()
        self.norms += self.weights[i] * float(torch.dot(x, x))

    def add_mean(self, mean: torch.Tensor) -> None:
        x = mean.reshape(-1)
        self.mean_norm += float(torch.dot(x, x))

    def cosine(self) -> float | None:
        s = sum(w * w for w in self.weights)
        if self.norms <= 0 or s >= 1:
            return None
        return (self.mean_norm / self.norms - s) / (1 - s)


_Job = tuple[int, str, Piece]  # (ingredient index, tensor name, piece)


class _Window:
    """Reads `jobs` in order with up to `workers` in flight and at most `ahead` bytes
    requested but not yet consumed (one job always allowed, however big)."""

    def __init__(self, sources: Sequence[Source], specs: dict[str, TensorSpec],
                 jobs: Iterator[_Job], workers: int, ahead: int, stats: Stats) -> None:  # fmt: skip
        self.sources, self.specs, self.jobs = sources, specs, jobs
        self.ahead, self.stats = ahead, stats
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soup-read")
        self.inflight: deque[tuple[_Job, Future[torch.Tensor]]] = deque()
        self.inflight_bytes = 0
        self.workers = workers
        self._next: _Job | None = next(self.jobs, None)

    def _read(self, job: _Job) -> torch.Tensor:
        i, name, piece = job
        t0 = time.perf_counter()
        tensor = self.sources[i].read(piece, self.specs[name])
        self.stats.add(piece.length, time.perf_counter() - t0)
        return tensor

    def _fill(self) -> None:
        while self._next is not None and len(self.inflight) < self.workers:
            size = self._next[2].length
            if self.inflight and self.inflight_bytes + size > self.ahead:
                return
            job, self._next = self._next, next(self.jobs, None)
            self.inflight.append((job, self.pool.submit(self._read, job)))
            self.inflight_bytes += size

    def take(self) -> tuple[_Job, torch.Tensor]:
        self._fill()
        if not self.inflight:
            raise RuntimeError("soup reader: asked for more pieces than planned")
        job, future = self.inflight.popleft()
        tensor = future.result()
        self.inflight_bytes -= job[2].length
        self._fill()
        return job, tensor

    def close(self) -> None:
        for _, future in self.inflight:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


class Mixer:
    """Weighted mean of `sources`' tensors, produced in the order of `names`."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float] | None,
                 names: Sequence[str], *, workers: int = 4, ahead: int | None = None) -> None:  # fmt: skip
        self.sources = list(sources)
        self.specs = check_layout(self.sources)
        self.weights = normalised(weights, len(self.sources))
        self.uniform = len(set(self.weights)) == 1
        self.names = list(names)
        self.stats = Stats()
        self.similarity = Similarity(self.weights)
        self.ties: dict[str, str] = {}  # later name -> the earlier name it equals everywhere
        self._signatures: dict[tuple[object, ...], str] = {}
        self._tie_candidates = _tie_candidates(self.specs)
        largest = max(p.length for s in self.sources for ps in s.pieces.values() for p in ps)
        budget = ahead or default_ahead(self.sources[0].model_bytes, largest)
        self._window = _Window(self.sources, self.specs, self._jobs(), workers, budget, self.stats)
        self._position = 0

    def _contributors(self, spec: TensorSpec) -> list[int]:
        if not spec.averaged:
            return [0]
        return [i for i, w in enumerate(self.weights) if w > 0]

    def _jobs(self) -> Iterator[_Job]:
        for name in self.names:
            for i in self._contributors(self.specs[name]):
                for piece in self.sources[i].pieces[name]:
                    yield i, name, piece

    def bytes_planned(self) -> int:
        return sum(
            p.length
            for name in self.names
            for i in self._contributors(self.specs[name])
            for p in self.sources[i].pieces[name]
        )

    def next(self, name: str) -> torch.Tensor:
        """The soup's tensor `name`; names must be asked for in the planned order."""
        if self._position >= len(self.names) or self.names[self._position] != name:
            raise RuntimeError(f"soup: {name} asked out of order")
        self._position += 1
        spec = self.specs[name]
        contributors = self._contributors(spec)
        if spec.averaged:
            acc_dtype = torch.float64 if spec.dtype.itemsize >= 4 else torch.float32
            acc = torch.zeros(spec.shape, dtype=acc_dtype)
        else:
            acc = torch.empty(spec.shape, dtype=spec.dtype)
        compare = spec.averaged and len(spec.shape) >= 2 and len(contributors) > 1
        hashes: list[str] = []
        for i in contributors:
            h = xxhash.xxh3_64() if name in self._tie_candidates else None
            for piece in self.sources[i].pieces[name]:
                (_, got, _), tensor = self._window.take()
                assert got == name, (got, name)
                where = tuple(slice(a, a + n) for a, n in zip(piece.at, piece.shape, strict=True))
                self._add(acc[where], tensor, spec, i)
                if compare:
                    self.similarity.add_piece(i, tensor)
                if h is not None:
                    h.update(repr(piece.at).encode())
                    h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            if h is not None:
                hashes.append(h.hexdigest())
        self._note_tie(name, spec, hashes)
        if not spec.averaged:
            return acc
        if self.uniform:
            acc.div_(len(self.weights))
        if compare:
            self.similarity.add_mean(acc)
        return acc.to(spec.dtype)

    def _add(self, region: torch.Tensor, tensor: torch.Tensor, spec: TensorSpec, i: int) -> None:
        if not spec.averaged:
            region.copy_(tensor)
        elif self.uniform:
            region.add_(tensor)
        else:
            region.add_(tensor, alpha=self.weights[i])

    def _note_tie(self, name: str, spec: TensorSpec, hashes: list[str]) -> None:
        if not hashes:
            return
        signature = (spec.dtype, spec.shape, *hashes)
        earlier = self._signatures.setdefault(signature, name)
        if earlier != name:
            self.ties[name] = earlier

    def close(self) -> None:
        self._window.close()


def _tie_candidates(specs: dict[str, TensorSpec]) -> set[str]:
    """Names sharing dtype and shape with another name: only these can be tied."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, spec in specs.items():
        if spec.nbytes:
            groups.setdefault((spec.dtype, spec.shape), []).append(name)
    return {name for names in groups.values() if len(names) > 1 for name in names}
