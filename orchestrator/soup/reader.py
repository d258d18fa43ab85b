"""Model tensors of one ingredient, read one stored piece at a time, with no model code.

A DCP checkpoint stores each tensor as one or more pieces (one for a DDP save; one per rank
for an FSDP-sharded tensor): `.metadata` (read through dcp_io's restricted unpickler) says,
for every piece, which file holds it, at which byte range, and where it sits in the full
tensor. Reading a piece is one ranged read of those bytes and a `torch.load(weights_only=True)`
of them; placing pieces at their offsets is the resharding DCP's own loader does, without a
process group and without ever holding the whole checkpoint. Optimizer entries are never
touched. A `.safetensors` file is the same with one piece per tensor, located by its header.

Reads go through `Store.read_into` (local or s3://): one ranged read per request, into a
buffer the caller owns, so several threads can read in parallel without sharing a file handle. A big piece is read in byte ranges
(`plain_data_offset` says where its tensor bytes start), so no read needs a whole tensor.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from orchestrator.checkpoint.pieces import HEAD_BYTES, tensor_layout
from orchestrator.errors import CheckpointCorrupt, UsageError
from orchestrator.soup.ingredients import Ingredient

if TYPE_CHECKING:
    from orchestrator.checkpoint.manifest import Manifest
    from orchestrator.storage import S3Options, Store

VERIFY_BLOCK = 256 << 10  # bytes hashed at a time: verification memory stays tiny

# safetensors dtype code -> torch dtype
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float32/float64 inputs, float32 for 16-bit ones."""
    return torch.float64 if dtype.itemsize >= 4 else torch.float32


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the plain parameter name, e.g. `0.weight`
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def accumulator(self) -> torch.dtype:
        """What a mean of this tensor is summed in: float64 for float32/64, float32 for 16-bit."""
        return accumulator_dtype(self.dtype)

    @property
    def averaged(self) -> bool:
        """Floating tensors are averaged; integer and bool ones are copied from the first."""
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class Piece:
    file: str  # relative to the source's store
    offset: int  # byte range of the stored piece in `file`
    length: int
    at: tuple[int, ...]  # where the piece starts in the full tensor
    shape: tuple[int, ...]  # the piece's own shape


class Source:
    """One ingredient's model tensors: their specs, and reading their pieces."""

    def __init__(self, ingredient: Ingredient, store: Store) -> None:
        self.ingredient, self.store = ingredient, store
        self.specs: dict[str, TensorSpec] = {}
        self.pieces: dict[str, list[Piece]] = {}
        self.safetensors = ingredient.kind == "safetensors"
        self.data_dir = ""  # a DCP checkpoint's data directory under the store
        self.manifest: Manifest | None = None  # a DCP checkpoint's commit record

    @property
    def model_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def read(self, piece: Piece, spec: TensorSpec) -> torch.Tensor:
        """One stored piece as a tensor of `piece.shape` (read whole)."""
        raw = self.read_range(piece.file, piece.offset, piece.offset + piece.length)
        return self.decode(piece, spec, raw)

    def decode(self, piece: Piece, spec: TensorSpec, raw: memoryview) -> torch.Tensor:
        """The tensor in a whole stored piece's bytes: a view of them when the piece is plain
        (see `plain_data_offset`), else `torch.load(weights_only=True)`."""
        if self.safetensors:
            if not raw:
                return torch.empty(piece.shape, dtype=spec.dtype)
            return torch.frombuffer(raw, dtype=spec.dtype).reshape(piece.shape)
        at = plain_data_offset(bytes(raw[:HEAD_BYTES]), spec, piece)
        count = math.prod(piece.shape)
        if at is not None and count == 0:
            return torch.empty(piece.shape, dtype=spec.dtype)
        if at is not None:
            return torch.frombuffer(raw, dtype=spec.dtype, count=count, offset=at).reshape(
                piece.shape
            )
        try:
            tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or altered piece: name it, never trace back
            raise CheckpointCorrupt(
                f"{self.store.path(piece.file)}: {spec.name} does not load "
                f"({type(exc).__name__}); run `stockpot verify {self.ingredient.url}`"
            ) from None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != piece.shape:
            raise CheckpointCorrupt(f"{self.ingredient.url}: {spec.name}: piece is not as declared")
        return tensor

    def read_range(self, file: str, start: int, end: int) -> memoryview:
        """Bytes [start, end) of `file`: one ranged read (CheckpointCorrupt if the file ends)."""
        into = memoryview(bytearray(max(0, end - start)))
        self.read_into(file, start, into)
        return into

    def read_into(self, file: str, start: int, into: memoryview) -> None:
        """Fill `into` from byte `start` of `file` (CheckpointCorrupt if the file ends first)."""
        got = self.store.read_into(file, start, into)
        if got != len(into):
            raise CheckpointCorrupt(f"{self.store.path(file)}: truncated at byte {start + got}")

    def model_files(self) -> list[str]:
        """The files a soup reads: those holding model pieces, and DCP's `.metadata`."""
        files = {p.file for pieces in self.pieces.values() for p in pieces}
        if not self.safetensors:
            files.add(f"{self.data_dir}/.metadata" if self.data_dir else ".metadata")
        return sorted(files)


# --- the stored piece's layout ------------------------------------------------------------------


def plain_data_offset(head: bytes, spec: TensorSpec, piece: Piece) -> int | None:
    """Where the raw bytes of a stored piece's tensor start within the piece, if the piece is
    what DCP writes for a plain tensor of the piece's shape and dtype (`pieces.tensor_layout`).
    Then the piece can be read in byte ranges and viewed in place. None otherwise (read whole,
    `torch.load`ed). `head` is the piece's first bytes."""
    layout = tensor_layout(head, piece.length)
    if layout is None or layout.dtype != spec.dtype or layout.shape != piece.shape:
        return None
    return layout.data_offset


def open_source(ingredient: Ingredient, s3: S3Options | None = None) -> Source:
    from orchestrator.storage import Store

    if ingredient.kind == "safetensors":
        parent, _, name = ingredient.url.rpartition("/")
        source = Source(ingredient, Store(parent or ".", s3))
        _index_safetensors(source, name)
    else:
        source = Source(ingredient, Store(ingredient.url, s3))
        _index_dcp(source)
    if not source.specs:
        raise UsageError(f"{ingredient.url}: no model tensors")
    return source


def _index_safetensors(source: Source, name: str) -> None:
    with source.store.open_read(name) as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 << 20:
            raise CheckpointCorrupt(f"{source.store.path(name)}: not a safetensors file")
        header = json.loads(f.read(size))
    base = 8 + size
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in _ST_DTYPES:
            raise UsageError(f"{source.store.path(name)}: {key} has dtype {entry['dtype']}")
        shape = tuple(int(n) for n in entry["shape"])
        start, end = entry["data_offsets"]
        source.specs[key] = TensorSpec(key, _ST_DTYPES[entry["dtype"]], shape)
        zero = tuple(0 for _ in shape)
        source.pieces[key] = [Piece(name, base + start, end - start, zero, shape)]


def _index_dcp(source: Source) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from orchestrator.checkpoint import catalog, dcp_io
    from orchestrator.checkpoint.weights import choose_prefix

    source.manifest = catalog.load_info(source.store).manifest
    data = source.data_dir = source.manifest.data_dir
    md = dcp_io.read_metadata(source.store, data)
    prefix = choose_prefix(md.state_dict_metadata, "auto")
    for key, meta in md.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            name = key[len(prefix) :]
            source.specs[name] = TensorSpec(name, meta.properties.dtype, tuple(meta.size))
            source.pieces[name] = []
    for index, info in md.storage_data.items():
        name = index.fqn[len(prefix) :]
        if not index.fqn.startswith(prefix) or name not in source.pieces:
            continue  # optimizer state and other entries: never read
        if info.transform_descriptors:
            raise UsageError(
                f"{source.ingredient.url}: {name} is stored transformed "
                f"({', '.join(info.transform_descriptors)}), which soups cannot read"
            )
        meta = md.state_dict_metadata[index.fqn]
        chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset))  # type: ignore[union-attr]
        file = f"{data}/{info.relative_path}" if data else info.relative_path
        source.pieces[name].append(
            Piece(file, info.offset, info.length, tuple(chunk.offsets), tuple(chunk.sizes))
        )
    for name, pieces in source.pieces.items():
        if not pieces:
            raise CheckpointCorrupt(f"{source.ingredient.url}: {name} has no stored data")


def verify(source: Source, checksums: bool, files: Sequence[str] | None = None) -> list[str]:
    """Problems of a DCP ingredient's `files` (default: every file the soup reads) against its
    manifest ([] if whole), each naming a file. Checksums read each file once (hashed in small
    blocks, never loaded); `checksums=False` compares sizes only. Optimizer files are never
    read by a soup, so never checked here (`stockpot verify` checks every file)."""
    if source.safetensors:
        return []
    from dataclasses import replace

    from orchestrator.checkpoint import catalog

    manifest = source.manifest or catalog.load_info(source.store).manifest
    wanted = set(source.model_files() if files is None else files)
    mine = replace(manifest, files={k: v for k, v in manifest.files.items() if k in wanted})
    problems = [
        f"{source.store.path(f)}: not in the manifest" for f in sorted(wanted - set(mine.files))
    ]
    return problems + catalog.verify(source.store, mine, checksums=checksums, chunk=VERIFY_BLOCK)


def same_layout(a: Mapping[str, TensorSpec], b: Mapping[str, TensorSpec]) -> str | None:
    """The first difference between two ingredients' tensors (a one-line reason), or None."""
    for name in sorted(set(a) | set(b)):
        if name not in b:
            return f"{name} is missing from the second"
        if name not in a:
            return f"{name} is missing from the first"
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return f"{name} has shape {list(x.shape)} vs {list(y.shape)}"
        if x.dtype != y.dtype:
            return f"{name} has dtype {x.dtype} vs {y.dtype}".replace("torch.", "")
    return None
