"""Model tensors of one ingredient, read one stored piece at a time, with no model code.

A DCP checkpoint stores each tensor as one or more pieces (one for a DDP save; one per rank
for an FSDP-sharded tensor): the format's index (`format.stored_items`) says, for every piece,
which file holds it, at which byte range, and where it sits in the full tensor. Reading a piece
is one ranged read of those bytes, decoded by the format (`format.decode_piece`); placing
pieces at their offsets is the resharding DCP's own loader does, without a process group and
without ever holding the whole checkpoint. Optimizer entries are never touched. A
`.safetensors` file is the same with one piece per tensor, located by its header
(`format.read_safetensors_index`).

Reads go through `Store.read_into` (local or s3://): one ranged read per request, into a
buffer the caller owns, so several threads can read in parallel without sharing a file handle.
A big piece is read in byte ranges (`format.plain_data_offset` says where its tensor bytes
start), so no read needs a whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from orchestrator.checkpoint.format import (
    METADATA_NAME,
    Piece,
    StoredTensor,
    decode_piece,
    read_safetensors_index,
    stored_items,
)
from orchestrator.errors import CheckpointCorrupt, UsageError
from orchestrator.soup.ingredients import Ingredient

if TYPE_CHECKING:
    from orchestrator.checkpoint.format import Manifest
    from orchestrator.storage import StorageOptions, Store

VERIFY_BLOCK = 256 << 10  # bytes hashed at a time: verification memory stays tiny


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
        (`format.decode_piece`), else loaded."""
        if self.safetensors:
            if not raw:
                return torch.empty(piece.shape, dtype=spec.dtype)
            return torch.frombuffer(raw, dtype=spec.dtype).reshape(piece.shape)
        try:
            return decode_piece(raw, piece, spec.dtype)
        except ValueError as exc:  # a torn or altered piece: name it, never trace back
            raise CheckpointCorrupt(
                f"{self.store.path(piece.file)}: {spec.name} does not load ({exc}); "
                f"run `stockpot verify {self.ingredient.url}`"
            ) from None

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
            files.add(f"{self.data_dir}/{METADATA_NAME}" if self.data_dir else METADATA_NAME)
        return sorted(files)


def open_source(
    ingredient: Ingredient, storage: StorageOptions | None = None, prefix: str = "auto"
) -> Source:
    """`ingredient`'s model tensors, indexed; of a DCP checkpoint, those under `prefix`
    (soup.prefix: `auto`, a registered name such as `ema_999`, or a flat key prefix)."""
    from orchestrator.storage import Store

    if ingredient.kind == "safetensors":
        parent, _, name = ingredient.url.rpartition("/")
        source = Source(ingredient, Store(parent or ".", storage))
        _index_safetensors(source, name)
    else:
        source = Source(ingredient, Store(ingredient.url, storage))
        _index_dcp(source, prefix)
    if not source.specs:
        raise UsageError(f"{ingredient.url}: no model tensors")
    return source


def _index_safetensors(source: Source, name: str) -> None:
    with source.store.open_read(name) as f:
        _add(source, read_safetensors_index(f, name, source.store.path(name)))


def _index_dcp(source: Source, requested: str) -> None:
    from orchestrator.checkpoint import catalog
    from orchestrator.checkpoint.weights import choose_prefix

    manifest = source.manifest = catalog.load_info(source.store).manifest
    source.data_dir = manifest.data_dir
    # DCP's .metadata is unpickled to index the pieces: it is verified first, never parsed
    # unverified (the shards are checked as the soup reads them, checks.py).
    metadata = manifest.data_path(METADATA_NAME)
    problems = catalog.verify(source.store, manifest, checksums=True, names={metadata})
    if problems:
        raise CheckpointCorrupt(f"{problems[0]}; run `stockpot verify {source.ingredient.url}`")
    items = stored_items(source.store, source.data_dir)
    prefix = choose_prefix(items, requested)
    tensors = {}
    for key, stored in items.items():
        if stored is None or not key.startswith(prefix):
            continue  # optimizer state and other entries: never read
        name = key[len(prefix) :]
        if stored.transforms:
            raise UsageError(
                f"{source.ingredient.url}: {name} is stored transformed "
                f"({', '.join(stored.transforms)}), which soups cannot read"
            )
        if not stored.pieces:
            raise CheckpointCorrupt(f"{source.ingredient.url}: {name} has no stored data")
        tensors[name] = stored
    _add(source, tensors)


def _add(source: Source, tensors: Mapping[str, StoredTensor]) -> None:
    for name, stored in tensors.items():
        source.specs[name] = TensorSpec(name, stored.dtype, stored.shape)
        source.pieces[name] = list(stored.pieces)


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
