"""The safetensors format, both ways: one dtype table, the header and data writer, the header
reader.

A file is an 8-byte little-endian header length, the header (JSON: per tensor its dtype code,
shape and `data_offsets` relative to the data; `__metadata__`: str -> str), then the tensors'
raw little-endian bytes, row-major, one after another.

- `write_safetensors(f, entries, load, metadata)`: asks `load` for the tensors of each bounded
  batch, in file order, and streams their bytes (`stockpot export`, the chained job);
  `write_safetensors_parts` takes each tensor as consecutive flat parts (the soup writer).
- `read_safetensors_index(f, name, where)`: each tensor of a file as one stored piece
  (stored.py), located by the header, for readers that read byte ranges (the soup).

The dtype table is by name, so building entries and headers needs no torch import.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

from orchestrator.checkpoint.format.stored import Piece, StoredTensor
from orchestrator.errors import CheckpointCorrupt, StockpotError, UsageError

if TYPE_CHECKING:
    import torch

BATCH_BYTES = 256 << 20  # tensors loaded per `load` call; memory stays ~ one batch
SAFETENSORS_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 << 20  # the reference reader's limit: more is not a safetensors file

# (safetensors dtype code, torch dtype name): the one table, read both ways.
_DTYPES = (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
    ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("C64", "complex64"),
)  # fmt: skip
DTYPE_CODES = {name: code for code, name in _DTYPES}  # torch dtype name -> safetensors code
DTYPE_NAMES = {code: name for code, name in _DTYPES}  # safetensors code -> torch dtype name


def dtype_name(dtype: torch.dtype) -> str:
    """`float32` for torch.float32: the table's key."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (KeyError if the table has none)."""
    import torch

    dtype = getattr(torch, DTYPE_NAMES[code])
    assert isinstance(dtype, torch.dtype)
    return dtype


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the output file, described before any of its bytes are read."""

    name: str  # in the safetensors file: the plain parameter name, e.g. `fc.weight`
    key: str  # what `load` is asked for: the flat DCP key (`train.model.fc.weight`) or the name
    dtype: str  # torch dtype name, e.g. `float32`
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


class Sink(Protocol):
    """Where a file's bytes go: an open binary file, a Store.open_write() writer, a socket..."""

    def write(self, data: bytes | memoryview, /) -> object: ...


Loader = Callable[[list[TensorEntry]], Mapping[str, Any]]  # batch -> {entry.key: tensor}


def safetensors_header(
    entries: Iterable[TensorEntry],
    metadata: Mapping[str, str],
    order: Mapping[str, int] | None = None,
) -> tuple[bytes, list[TensorEntry]]:
    """The safetensors header (JSON, space-padded to 8 bytes) and the order the data must follow.

    Like the reference writer: largest item size first, so with an 8-aligned header every
    tensor starts aligned to its own item size; then by `order[name]` where given (a soup
    follows its ingredients' storage order), then by name.
    """
    rank = order or {}
    ordered = sorted(entries, key=lambda e: (-e.itemsize, rank.get(e.name, -1), e.name))
    body: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in ordered:
        body[e.name] = {
            "dtype": DTYPE_CODES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, ordered


def batches(entries: Sequence[TensorEntry], limit: int) -> Iterator[list[TensorEntry]]:
    """Consecutive runs of `entries` of at most `limit` bytes (one bigger tensor goes alone)."""
    batch: list[TensorEntry] = []
    size = 0
    for e in entries:
        if batch and size + e.nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(e)
        size += e.nbytes
    if batch:
        yield batch


def write_safetensors(
    f: Sink,
    entries: Iterable[TensorEntry],
    load: Loader,
    metadata: Mapping[str, str],
    *,
    batch_bytes: int = BATCH_BYTES,
    progress: Callable[[int], object] | None = None,
) -> int:
    """Write one safetensors file to `f`; returns the bytes of tensor data written.

    `load(batch)` returns the batch's tensors keyed by `entry.key`; it is called once per batch
    of at most `batch_bytes`, in file order, so only one batch is held at a time. `progress`
    is told each tensor's byte count as it is written.
    """
    if sys.byteorder != "little":  # safetensors is little-endian; raw tensor bytes are native
        raise StockpotError("writing safetensors needs a little-endian machine")
    header, ordered = safetensors_header(entries, metadata)
    f.write(header)
    for batch in batches(ordered, batch_bytes):
        loaded = dict(load(batch))
        for e in batch:
            f.write(raw_bytes(loaded.pop(e.key), e))
            if progress is not None:
                progress(e.nbytes)
    return sum(e.nbytes for e in ordered)


def write_safetensors_parts(
    f: Sink,
    entries: Iterable[TensorEntry],
    parts: Callable[[TensorEntry], Iterable[Any]],
    metadata: Mapping[str, str],
    *,
    order: Mapping[str, int] | None = None,
    progress: Callable[[int], object] | None = None,
) -> int:
    """Write one safetensors file to `f`, each tensor from `parts(entry)`: consecutive flat
    pieces of it in row-major order, each written before the next is asked for (so a producer
    may reuse its buffers). Returns the bytes of tensor data written."""
    import torch

    if sys.byteorder != "little":
        raise StockpotError("writing safetensors needs a little-endian machine")
    header, ordered = safetensors_header(entries, metadata, order)
    f.write(header)
    for e in ordered:
        written = 0
        for part in parts(e):
            flat = part.detach().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(flat.numpy()))
            written += flat.numel()
            if progress is not None:
                progress(flat.numel())
        if written != e.nbytes:
            raise CheckpointCorrupt(f"{e.key}: {written} bytes made, {e.nbytes} declared")
    return sum(e.nbytes for e in ordered)


def raw_bytes(tensor: Any, entry: TensorEntry) -> memoryview:
    """The tensor's bytes as safetensors stores them (row-major, native = little-endian)."""
    import torch

    if tuple(tensor.shape) != entry.shape or tensor.dtype.itemsize != entry.itemsize:
        raise CheckpointCorrupt(
            f"{entry.key}: loaded {tuple(tensor.shape)}, metadata says {entry.shape}"
        )
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def entry_for(name: str, tensor: Any) -> TensorEntry:
    """The entry of an in-memory tensor (`load` is then asked for it by `name`)."""
    dtype = dtype_name(tensor.dtype)
    if dtype not in DTYPE_CODES:
        raise StockpotError(f"{name} has dtype {dtype}, which safetensors cannot hold")
    return TensorEntry(name, name, dtype, tuple(tensor.shape), tensor.dtype.itemsize)


def read_safetensors_index(f: IO[bytes], name: str, where: str) -> dict[str, StoredTensor]:
    """Each tensor of the safetensors file `name` (named `where` in errors), read from `f`
    positioned at its start, as one stored piece: its raw bytes' absolute range in the file.
    CheckpointCorrupt if the header is not one; UsageError for a dtype torch cannot hold."""
    try:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"a {size}-byte header")
        header = json.loads(f.read(size))
        found = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry["dtype"] not in DTYPE_NAMES:
                raise UsageError(f"{where}: {key} has dtype {entry['dtype']}")
            shape = tuple(int(n) for n in entry["shape"])
            start, end = (int(n) for n in entry["data_offsets"])
            piece = Piece(name, 8 + size + start, end - start, tuple(0 for _ in shape), shape)
            found[key] = StoredTensor(torch_dtype(entry["dtype"]), shape, (piece,))
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointCorrupt(f"{where}: not a safetensors file ({exc})") from None
    return found
