"""The streaming mixer: a weighted mean of N ingredients, one segment of one tensor at a time.

For each output tensor, in the order the writer asks for them, each segment of it (segments.py:
at most `chunk` bytes, or a whole small piece) is read from every ingredient (a bounded window
of parallel reads ahead of the consumer, window.py) and added into one accumulator, float64
for float32/float64 inputs and float32 for 16-bit ones, cast to the input dtype once at the
end and handed to the writer before the next segment is read. Memory is the accumulator, one
output segment and the read-ahead window: independent of N, of the model's size and of its
largest tensor. The bytes read are hashed on the way (checks.py), so verifying the
ingredients costs no second read.

Integer and bool tensors (`num_batches_tracked`, masks, index buffers) are not averaged: they
are copied from the first ingredient (the others' bytes are only hashed). Ties: two names whose
tensors are bitwise equal in every ingredient (GPT-2's `lm_head.weight` and
`transformer.wte.weight`) get bitwise equal outputs (identical inputs, identical arithmetic)
and are reported in `ties`, so the writer can say so and a model that ties them re-ties them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import xxhash

from orchestrator.checkpoint.format import HEAD_BYTES
from orchestrator.errors import UsageError
from orchestrator.soup import segments
from orchestrator.soup.checks import StreamCheck
from orchestrator.soup.reader import (
    Source,
    TensorSpec,
    accumulator_dtype,
    same_layout,
)
from orchestrator.soup.segments import Read, Segment
from orchestrator.soup.window import Stats, Window

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

    try:  # libc is loaded already: no find_library (it runs `ldconfig -p` in a subprocess)
        libc = ctypes.CDLL(None)
        if hasattr(libc, "mallopt"):
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
    the start RSS is taken keeps the memory figures about the soup's data. On one thread,
    as the mix runs: with torch's default threads each tiny kernel waits for an OpenMP team,
    which on a loaded 2-core node made this 0.1-0.3 s instead of ~0.01.
    """
    threads = SingleThreaded()
    try:
        _warm_up(specs)
    finally:
        threads.restore()


def _warm_up(specs: Mapping[str, TensorSpec]) -> None:
    import io

    for dtype in {spec.dtype for spec in specs.values()}:
        x = torch.zeros(1 << 16, dtype=dtype)
        buf = io.BytesIO()
        torch.save(x, buf)
        x = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        xxhash.xxh3_64(x.view(torch.uint8).numpy())
        if dtype.is_floating_point:
            acc = torch.zeros(1 << 16, dtype=accumulator_dtype(dtype))
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
        x = piece.reshape(-1)
        self.add_squares(i, float(torch.dot(x, x)))

    def add_squares(self, i: int, squares: float) -> None:
        """Ingredient i's sum of squares over one piece of a matrix."""
        self.norms += self.weights[i] * squares

    def add_mean(self, mean: torch.Tensor) -> None:
        x = mean.reshape(-1)
        self.mean_norm += float(torch.dot(x, x))

    def cosine(self) -> float | None:
        s = sum(w * w for w in self.weights)
        if self.norms <= 0 or s >= 1:
            return None
        return (self.mean_norm / self.norms - s) / (1 - s)


class Mixer:
    """Weighted mean of `sources`' tensors, produced in the order of `names`, segment by
    segment (`chunks`) or whole (`next`). With `checksums`, the files it reads are hashed on
    the way (`checks.finish()` after the last tensor)."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float] | None,
                 names: Sequence[str], *, workers: int = 4, ahead: int | None = None,
                 chunk: int | None = None, checksums: bool = False) -> None:  # fmt: skip
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
        model = self.sources[0].model_bytes
        self.chunk = chunk or segments.chunk_bytes(model)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soup-read")
        offsets = segments.head_offsets(self.sources, self.specs, self._contributors, self.chunk,
                                    self._pool)  # fmt: skip
        self.segments = segments.build(self.sources, self.specs, self.names, self._contributors,
                                   self._hashed, self.chunk, offsets)  # fmt: skip
        reads = [r for seg in self.segments for r in seg.reads]
        self.checks = StreamCheck(self.sources, reads, checksums)
        largest = max((r.length for r in reads), default=0)
        budget = ahead or default_ahead(model, largest)
        slot = self.chunk + 2 * HEAD_BYTES  # a chunk and the zip records around it
        self._window = Window(self.sources, iter(reads), self._pool, workers, budget, slot,
                              self.stats, self.checks.feed if checksums else None)  # fmt: skip
        self._position = self._segment = self._turn = 0
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _contributors(self, spec: TensorSpec) -> list[int]:
        if not spec.averaged:
            return [0]
        return [i for i, w in enumerate(self.weights) if w > 0]

    def _hashed(self, spec: TensorSpec) -> list[int]:
        """Ingredients read only to check their files: the others of a copied (int) tensor."""
        return [] if spec.averaged else [i for i, w in enumerate(self.weights) if w > 0 and i]

    def bytes_planned(self) -> int:
        return sum(r.length for seg in self.segments for r in seg.reads)

    def next(self, name: str) -> torch.Tensor:
        """The soup's whole tensor `name` (a new tensor)."""
        spec = self.specs[name]
        out = torch.empty(math.prod(spec.shape), dtype=spec.dtype)
        at = 0
        for part in self.chunks(name):
            out[at : at + part.numel()] = part
            at += part.numel()
        return out.reshape(spec.shape)

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """The soup's tensor `name` as consecutive flat parts, in row-major order. Each part is
        valid until the one after the next is asked for (two output buffers take turns, so a
        writer may still be writing one part while the next is mixed); names must come in
        order."""
        if self._position >= len(self.names) or self.names[self._position] != name:
            raise RuntimeError(f"soup: {name} asked out of order")
        self._position += 1
        spec = self.specs[name]
        hashes = {i: xxhash.xxh3_64() for i in self._contributors(spec)} \
            if name in self._tie_candidates else None  # fmt: skip
        while self._segment < len(self.segments) and self.segments[self._segment].name == name:
            seg = self.segments[self._segment]
            self._segment += 1
            yield self._whole(seg, spec, hashes) if seg.whole else self._mix(seg, spec, hashes)
        if hashes is not None:
            self._note_tie(name, spec, [h.hexdigest() for h in hashes.values()])

    def _take(self, seg: Segment, spec: TensorSpec) -> Iterator[tuple[Read, torch.Tensor | None]]:
        """Each read of `seg`, checked, with its tensor (flat for streamed segments). A tensor
        stays valid until the one after it is taken (the mix adds the first two in one pass)."""
        held: memoryview | None = None
        for want in seg.reads:
            r, data = self._window.take()
            assert r is want, (r, want)  # the window fed it to the checksums
            if r.mode == "hash":
                yield r, None
            elif r.mode == "range":
                yield r, torch.frombuffer(data, dtype=spec.dtype, count=seg.count, offset=r.skip)
            else:
                yield r, self.sources[r.source].decode(r.piece, spec, data)
            if held is not None:
                self._window.release(held)  # its buffer serves a later read
            held = data
        if held is not None:
            self._window.release(held)

    def _buffer(self, role: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        have = self._buffers.get((role, dtype))
        if have is None or have.numel() < n:
            have = self._buffers[(role, dtype)] = torch.empty(n, dtype=dtype)
        return have[:n]

    def _mix(self, seg: Segment, spec: TensorSpec, hashes: dict[int, Any] | None) -> torch.Tensor:
        acc_dtype = spec.accumulator
        acc = self._buffer("acc", acc_dtype, seg.count)
        compare = len(spec.shape) >= 2 and len(seg.reads) > 1
        first: Any = None  # the first ingredient's array, added with the second
        for k, (r, x) in enumerate(self._take(seg, spec)):
            assert x is not None
            x = x.reshape(-1)
            if hashes is not None:
                hashes[r.source].update(x.view(torch.uint8).numpy())
            if self.uniform and spec.dtype in _NUMPY_ADDS:
                # numpy adds float32 arrays into a float64 one in one pass, without a copy; the
                # first two in one pass too (float64(x0) + float64(x1), as copy then add)
                a, xn = acc.numpy(), x.numpy()
                if k == 0 and len(seg.reads) == 1:
                    np.copyto(a, xn)
                elif k == 1:
                    np.add(first, xn, out=a, dtype=np.float64)
                elif k > 1:
                    np.add(a, xn, out=a)
                first = xn
                if compare:
                    self.similarity.add_squares(r.source, float(np.dot(xn, xn)))
                continue
            # cast into a float buffer, then add alike dtypes: torch's mixed-dtype add_ is ~8x
            # slower (it allocates a converted copy of every operand)
            scratch = acc if k == 0 else self._buffer("scratch", acc_dtype, seg.count)
            scratch.copy_(x)
            if compare:
                self.similarity.add_piece(r.source, scratch)
            if k == 0:
                if not self.uniform:
                    acc.mul_(self.weights[r.source])
            else:
                acc.add_(scratch, alpha=1.0 if self.uniform else self.weights[r.source])
        if self.uniform:
            acc.div_(len(self.weights))
        if compare:
            self.similarity.add_mean(acc)
        self._turn ^= 1
        out = self._buffer(("out", "out2")[self._turn], spec.dtype, seg.count)
        if spec.dtype in _NUMPY_ADDS:  # numpy's cast: the same rounding, ~30% faster
            np.copyto(out.numpy(), acc.numpy(), casting="unsafe")
        else:
            out.copy_(acc)
        return out

    def _whole(self, seg: Segment, spec: TensorSpec, hashes: dict[int, Any] | None) -> torch.Tensor:
        """A tensor made from whole pieces: mixed layouts, or a copied (int) tensor."""
        if spec.averaged:
            acc_dtype = spec.accumulator
            acc = torch.zeros(spec.shape, dtype=acc_dtype)
        else:
            acc = torch.empty(spec.shape, dtype=spec.dtype)
        compare = spec.averaged and len(spec.shape) >= 2 and len(self._contributors(spec)) > 1
        for r, tensor in self._take(seg, spec):
            if tensor is None:
                continue
            piece = r.piece
            if hashes is not None:
                hashes[r.source].update(repr(piece.at).encode())
                hashes[r.source].update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            where = tuple(slice(a, a + n) for a, n in zip(piece.at, piece.shape, strict=True))
            if not spec.averaged:
                acc[where].copy_(tensor)
                continue
            if compare:
                self.similarity.add_piece(r.source, tensor.to(acc_dtype))
            acc[where].add_(tensor, alpha=1.0 if self.uniform else self.weights[r.source])
        if not spec.averaged:
            return acc.reshape(-1)
        if self.uniform:
            acc.div_(len(self.weights))
        if compare:
            self.similarity.add_mean(acc)
        return acc.to(spec.dtype).reshape(-1)

    def _note_tie(self, name: str, spec: TensorSpec, hashes: list[str]) -> None:
        if not hashes:
            return
        signature = (spec.dtype, spec.shape, *hashes)
        earlier = self._signatures.setdefault(signature, name)
        if earlier != name:
            self.ties[name] = earlier

    def close(self) -> None:
        self._window.close()
        self._pool.shutdown(wait=True, cancel_futures=True)


# float16 stays on the torch path: numpy would sum its squares (the similarity) in float16
_NUMPY_ADDS = (torch.float32, torch.float64)


def _tie_candidates(specs: dict[str, TensorSpec]) -> set[str]:
    """Names sharing dtype and shape with another name: only these can be tied."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, spec in specs.items():
        if spec.nbytes:
            groups.setdefault((spec.dtype, spec.shape), []).append(name)
    return {name for names in groups.values() if len(names) > 1 for name in names}
