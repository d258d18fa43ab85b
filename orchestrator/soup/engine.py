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
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xxhash

from orchestrator.errors import UsageError
from orchestrator.soup.reader import Piece, Source, TensorSpec, same_layout

MIN_AHEAD = 1 << 20
MAX_AHEAD = 256 << 20


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
    """Read-ahead budget: ~1/64 of one model, within [1 MB, 256 MB], never below one piece."""
    return max(largest_piece, min(MAX_AHEAD, max(MIN_AHEAD, model_bytes // 64)))


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
    """Cosine between the first ingredient's weight matrices and each other's, all matrices
    together. Fine-tunes of one model stay close to it (cosine near 1); independently
    initialised models are near-orthogonal (near 0), and their soup collapses."""

    def __init__(self, n: int) -> None:
        self.dot, self.norm_a, self.norm_b = [0.0] * n, [0.0] * n, [0.0] * n

    def add(self, i: int, a: torch.Tensor, b: torch.Tensor) -> None:
        x, y = a.reshape(-1).float(), b.reshape(-1).float()
        self.dot[i] += float(torch.dot(x, y))
        self.norm_a[i] += float(torch.dot(x, x))
        self.norm_b[i] += float(torch.dot(y, y))

    def cosines(self) -> dict[int, float]:
        return {
            i: self.dot[i] / ((self.norm_a[i] * self.norm_b[i]) ** 0.5 or 1.0)
            for i in range(1, len(self.dot))
            if self.norm_a[i] > 0
        }


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
        self.similarity = Similarity(len(self.sources))
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
        # Matrices of the first ingredient are kept while the others stream past, for the
        # model-free relatedness measure (one extra tensor of memory).
        compare = spec.averaged and len(spec.shape) >= 2 and len(contributors) > 1
        first = torch.empty(spec.shape, dtype=spec.dtype) if compare else None
        hashes: list[str] = []
        for i in contributors:
            h = xxhash.xxh3_64() if name in self._tie_candidates else None
            for piece in self.sources[i].pieces[name]:
                (_, got, _), tensor = self._window.take()
                assert got == name, (got, name)
                where = tuple(slice(a, a + n) for a, n in zip(piece.at, piece.shape, strict=True))
                self._add(acc[where], tensor, spec, i)
                if first is not None:
                    if i == contributors[0]:
                        first[where] = tensor
                    else:
                        self.similarity.add(i, first[where], tensor)
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
