"""The soup's read plan: which byte ranges of which ingredient files make each output chunk.

A tensor is made in segments of its flat (row-major) elements, each read from every
contributing ingredient and mixed before the next is read, so memory is bounded by the
segment size, not by the tensor:

- a piece of at most `chunk` bytes is one segment, read whole (one request);
- a bigger plain piece (`format.plain_data_offset`) is cut into `chunk`-byte segments, each
  one ranged read per ingredient. The first read of a piece also covers its zip records
  before the data and the last one those after it, so the reads of one file, in plan order,
  cover every byte of the pieces they touch (the stream checksums rely on it);
- where the ingredients store a tensor differently (pieces at other offsets: a DDP and an FSDP
  save of one model) or not row by row, the tensor is one `whole` segment: every piece read
  whole and placed at its offset, as DCP's own loader does.

Integer and bool tensors are copied from the first ingredient: a `whole` segment whose reads
of the other ingredients are `hash` reads, kept only so every file is checked in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

from orchestrator.checkpoint.format import HEAD_BYTES, Piece, plain_data_offset
from orchestrator.soup.reader import Source, TensorSpec

MIN_CHUNK, MAX_CHUNK = 256 << 10, 16 << 20

Mode = Literal["range", "piece", "hash"]
_HeadKey = tuple[int, str, int]  # (ingredient index, file, piece offset)


@dataclass(frozen=True)
class Read:
    source: int  # index of the ingredient in the mixer's sources
    file: str
    start: int  # byte range of `file`
    end: int
    piece: Piece
    # "range": the segment's elements are at [skip, skip + count * itemsize) of the bytes read;
    # "piece": a whole stored piece, decoded; "hash": read for the checksums only.
    mode: Mode
    skip: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Segment:
    name: str
    first: int  # the first flat element of the output tensor this segment makes
    count: int
    reads: tuple[Read, ...]  # in ingredient order
    whole: bool = False  # the whole tensor, from pieces placed by `Piece.at`


def chunk_bytes(model_bytes: int) -> int:
    """Segment size: 1/256 of one model, within [256 kB, 16 MB], a multiple of 64 bytes."""
    return min(MAX_CHUNK, max(MIN_CHUNK, model_bytes // 256)) // 64 * 64


def storage_order(source: Source) -> dict[str, int]:
    """Each tensor's rank in `source`'s storage order (by its first piece's file and offset):
    writing the soup in this order reads every ingredient saved alike file by file, in order."""
    first = {name: min((p.file, p.offset) for p in ps) for name, ps in source.pieces.items() if ps}
    return {name: k for k, name in enumerate(sorted(first, key=first.__getitem__))}


def _rows(spec: TensorSpec, piece: Piece) -> bool:
    """A piece holding whole rows (dim-0 sharding, as FSDP and DDP save): flat-contiguous."""
    return piece.shape[1:] == spec.shape[1:] and all(a == 0 for a in piece.at[1:])


def _whole(i: int, p: Piece, mode: Mode) -> Read:
    """A read of ingredient i's whole stored piece `p`."""
    return Read(i, p.file, p.offset, p.offset + p.length, p, mode)


def _sorted(pieces: Sequence[Piece]) -> list[Piece]:
    return sorted(pieces, key=lambda p: p.at)


def head_offsets(sources: Sequence[Source], specs: Mapping[str, TensorSpec],
                 contributors: Callable[[TensorSpec], Sequence[int]], chunk: int,
                 pool: Executor) -> dict[_HeadKey, int | None]:  # fmt: skip
    """Where the tensor bytes start in every piece bigger than `chunk` (one small ranged read
    each, in parallel); None where a piece is not plain."""
    wanted: list[tuple[_HeadKey, Source, Piece, TensorSpec]] = []
    for name, spec in specs.items():
        if not spec.averaged:
            continue
        for i in contributors(spec):
            source = sources[i]
            for p in source.pieces[name]:
                if p.length > chunk and not source.safetensors:
                    wanted.append(((i, p.file, p.offset), source, p, spec))

    def one(source: Source, p: Piece, spec: TensorSpec) -> int | None:
        head = source.read_range(p.file, p.offset, p.offset + min(HEAD_BYTES, p.length))
        return plain_data_offset(bytes(head), p, spec.dtype)

    futures = [(key, pool.submit(one, s, p, spec)) for key, s, p, spec in wanted]
    return {key: future.result() for key, future in futures}


def build(sources: Sequence[Source], specs: Mapping[str, TensorSpec], names: Sequence[str],
          contributors: Callable[[TensorSpec], Sequence[int]], hashed: Callable[[TensorSpec], Sequence[int]],
          chunk: int, offsets: Mapping[_HeadKey, int | None]) -> list[Segment]:  # fmt: skip
    """Every segment of every tensor in `names`, in order."""
    segments: list[Segment] = []
    for name in names:
        spec = specs[name]
        who = list(contributors(spec))
        layouts = [[(p.at, p.shape) for p in _sorted(sources[i].pieces[name])] for i in who]
        plain_rows = all(_rows(spec, p) for i in who for p in sources[i].pieces[name])
        if spec.averaged and plain_rows and all(layout == layouts[0] for layout in layouts):
            segments.extend(_streamed(sources, spec, who, chunk, offsets))
            continue
        reads = [_whole(i, p, "piece") for i in who for p in _sorted(sources[i].pieces[name])]
        reads += [
            _whole(i, p, "hash") for i in hashed(spec) for p in _sorted(sources[i].pieces[name])
        ]
        segments.append(Segment(name, 0, math.prod(spec.shape), tuple(reads), whole=True))
    return segments


def _streamed(sources: Sequence[Source], spec: TensorSpec, who: Sequence[int], chunk: int,
              offsets: Mapping[_HeadKey, int | None]) -> list[Segment]:  # fmt: skip
    row = math.prod(spec.shape[1:]) if spec.shape else 1
    size = spec.dtype.itemsize
    per_source = [_sorted(sources[i].pieces[spec.name]) for i in who]
    out: list[Segment] = []
    for k, lead in enumerate(per_source[0]):
        pieces = [ps[k] for ps in per_source]
        first, count = (lead.at[0] * row if lead.at else 0), math.prod(lead.shape)
        data = [offsets.get((i, p.file, p.offset)) for i, p in zip(who, pieces, strict=True)]
        if max(p.length for p in pieces) <= chunk or any(d is None for d in data) or count == 0:
            whole = tuple(_whole(i, p, "piece") for i, p in zip(who, pieces, strict=True))
            out.append(Segment(spec.name, first, count, whole))
            continue
        per = max(1, chunk // size)
        parts = math.ceil(count / per)
        for j in range(parts):
            e0, e1 = j * per, min(count, (j + 1) * per)
            reads = []
            for i, p, d in zip(who, pieces, data, strict=True):
                assert d is not None
                start = p.offset + (0 if j == 0 else d + e0 * size)
                end = p.offset + (d + e1 * size if j < parts - 1 else p.length)
                reads.append(Read(i, p.file, start, end, p, "range", d if j == 0 else 0))
            out.append(Segment(spec.name, first + e0, e1 - e0, tuple(reads)))
    return out
