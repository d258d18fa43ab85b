"""Model tensors of one ingredient, read one stored piece at a time, with no model code.

A DCP checkpoint stores each tensor as one or more pieces (one for a DDP save; one per rank
for an FSDP-sharded tensor): `.metadata` (read through dcp_io's restricted unpickler) says,
for every piece, which file holds it, at which byte range, and where it sits in the full
tensor. Reading a piece is one ranged read of those bytes and a `torch.load(weights_only=True)`
of them; placing pieces at their offsets is the resharding DCP's own loader does, without a
process group and without ever holding the whole checkpoint. Optimizer entries are never
touched. A `.safetensors` file is the same with one piece per tensor, located by its header.

Reads go through `Store` (local or s3://): one ranged GET per piece, so several threads can
read in parallel without sharing a file handle.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from orchestrator.errors import CheckpointCorrupt, UsageError
from orchestrator.soup.ingredients import Ingredient

if TYPE_CHECKING:
    from orchestrator.storage import S3Options, Store

VERIFY_BLOCK = 256 << 10  # bytes hashed at a time: verification memory stays tiny

# safetensors dtype code -> torch dtype
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the plain parameter name, e.g. `0.weight`
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

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

    @property
    def model_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def read(self, piece: Piece, spec: TensorSpec) -> torch.Tensor:
        """One stored piece as a tensor of `piece.shape`."""
        raw = self._read_range(piece)
        if self.safetensors:
            if not raw:
                return torch.empty(piece.shape, dtype=spec.dtype)
            return torch.frombuffer(bytearray(raw), dtype=spec.dtype).reshape(piece.shape)
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

    def _read_range(self, piece: Piece) -> bytes:
        fs = self.store.fsspec_filesystem()
        end = piece.offset + piece.length
        data: bytes = fs.cat_file(self.store.path(piece.file), start=piece.offset, end=end)
        if len(data) != piece.length:
            raise CheckpointCorrupt(f"{self.store.path(piece.file)}: truncated ({len(data)} bytes)")
        return data


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

    data = catalog.load_info(source.store).manifest.data_dir
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


def verify(source: Source, checksums: bool) -> list[str]:
    """Problems of a DCP ingredient against its manifest ([] if whole), each naming a file.
    Checksums read every file once, optimizer bytes included (hashed in 1 MB blocks, never
    loaded); `checksums=False` compares sizes only."""
    if source.safetensors:
        return []
    from orchestrator.checkpoint import catalog

    manifest = catalog.load_info(source.store).manifest
    return catalog.verify(source.store, manifest, checksums=checksums, chunk=VERIFY_BLOCK)


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
