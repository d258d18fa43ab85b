"""Model weights out of a committed checkpoint into one safetensors file, with no model code.

Two layers:
- `write_safetensors(f, entries, load, metadata)`: the format writer. It knows nothing about
  checkpoints: it asks `load` for the tensors of each bounded batch, in file order, and streams
  their bytes. `stockpot export` and the chained job use it through `export_checkpoint`; the soup
  writer gives it its own `load`.
- `export_checkpoint(ckpt, dest, name, prefix)`: a committed DCP checkpoint's model tensors under
  their plain names (`fc.weight`), read one batch at a time through DCP's metadata, so memory
  stays about one batch whatever the model's size.

The dtype table is by name, so building entries and headers needs no torch import.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.checkpoint.weights import choose_prefix
from orchestrator.errors import CheckpointCorrupt, StockpotError, UsageError

if TYPE_CHECKING:
    from orchestrator.storage import Store

BATCH_BYTES = 256 << 20  # tensors loaded per `load` call; memory stays ~ one batch
SAFETENSORS_SUFFIX = ".safetensors"

# torch dtype name -> safetensors dtype code.
DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "complex64": "C64",
}  # fmt: skip


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


@dataclass(frozen=True)
class Exported:
    """What `export_checkpoint` wrote."""

    path: str
    step: int
    tensors: int
    nbytes: int
    skipped: list[str] = field(default_factory=list)  # non-tensor items under the prefix


class Sink(Protocol):
    """Where a file's bytes go: an open binary file, a Store.open_write() writer, a socket..."""

    def write(self, data: bytes | memoryview, /) -> object: ...


Loader = Callable[[list[TensorEntry]], Mapping[str, Any]]  # batch -> {entry.key: tensor}


# --- the format ----------------------------------------------------------------------------


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
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPE_CODES:
        raise StockpotError(f"{name} has dtype {dtype}, which safetensors cannot hold")
    return TensorEntry(name, name, dtype, tuple(tensor.shape), tensor.dtype.itemsize)


def check_out_name(out: str) -> str:
    """`out` when it names a .safetensors file; else a UsageError suggesting one."""
    name = out.rsplit("/", 1)[-1]
    if name.endswith(SAFETENSORS_SUFFIX) and name != SAFETENSORS_SUFFIX:
        return out
    fixed = out[: len(out) - len(name)] + (name.split(".", 1)[0] or "model") + SAFETENSORS_SUFFIX
    raise UsageError(f"--out must name a {SAFETENSORS_SUFFIX} file, e.g. --out {fixed}")


# --- from a DCP checkpoint -----------------------------------------------------------------


def model_entries(tensors: Mapping[str, Any], prefix: str) -> tuple[list[TensorEntry], list[str]]:
    """The tensors under `prefix` (DCP metadata), renamed to plain names; and the keys of the
    non-tensor items there, which safetensors cannot hold."""
    entries, skipped = [], []
    for key, meta in tensors.items():
        if not key.startswith(prefix):
            continue
        if not hasattr(meta, "size"):  # BytesStorageMetadata: a pickled object, not a tensor
            skipped.append(key)
            continue
        dtype = str(meta.properties.dtype).removeprefix("torch.")
        if dtype not in DTYPE_CODES:
            raise StockpotError(f"{key} has dtype {dtype}, which safetensors cannot hold")
        itemsize = meta.properties.dtype.itemsize
        entries.append(TensorEntry(key[len(prefix) :], key, dtype, tuple(meta.size), itemsize))
    if not entries:
        raise UsageError(f"no tensors under {prefix!r}")
    return entries, sorted(skipped)


def export_checkpoint(
    ckpt: Store,
    dest: Store,
    name: str,
    *,
    prefix: str = "auto",
    progress: Callable[[int], object] | None = None,
) -> Exported:
    """Write the model tensors of the committed checkpoint `ckpt` to `dest/name`.

    The sizes in the manifest are checked first (a damaged checkpoint is refused, not
    exported); the file lands only when complete (Store.open_write), nothing is left on error.
    `prefix`: the flat key prefix of the model (`train.model.`), or `auto` for the only one.
    """
    from orchestrator.checkpoint import catalog, dcp_io
    from orchestrator.checkpoint.layout import CHECKPOINTS_DIR, MANIFEST_NAME
    from orchestrator.ties import recorded_aliases

    if not ckpt.exists(MANIFEST_NAME):
        hint = (
            f" (a run directory: pass one of its {CHECKPOINTS_DIR}/step-* dirs)"
            if ckpt.exists(CHECKPOINTS_DIR)
            else ""
        )
        raise UsageError(f"{ckpt.path()} is not a committed checkpoint (no {MANIFEST_NAME}){hint}")
    info = catalog.load_info(ckpt)
    problems = catalog.verify(ckpt, info.manifest, checksums=False)
    if problems:
        raise CheckpointCorrupt(f"refusing to export {ckpt.path()}: {'; '.join(problems)}")
    data = info.manifest.data_dir  # where DCP's files are, relative to the checkpoint
    tensors = dcp_io.read_metadata(ckpt, data).state_dict_metadata
    model_prefix = choose_prefix(tensors, prefix)
    entries, skipped = model_entries(tensors, model_prefix)
    # A tie is written once, under its owner's name, as save_pretrained does (orchestrator/ties.py).
    tied = recorded_aliases(ckpt, data, tensors, model_prefix)
    entries = [e for e in entries if e.name not in tied]
    metadata = {"format": "pt", "step": str(info.step), "source": ckpt.path()}
    with dest.open_write(name) as f:
        total = write_safetensors(
            f, entries, lambda batch: _load_batch(ckpt, data, batch), metadata, progress=progress
        )
    return Exported(dest.path(name), info.step, len(entries), total, skipped)


def _load_batch(ckpt: Store, data: str, batch: list[TensorEntry]) -> dict[str, Any]:
    import pickle

    from torch.distributed.checkpoint.api import CheckpointException

    from orchestrator.checkpoint import dcp_io

    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled": we know, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return dcp_io.load_flat(ckpt, data, [e.key for e in batch])
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, CheckpointException) as exc:
        # Sizes matched but the bytes do not load: the checksums would have caught it.
        # (torch's own message for this suggests weights_only=False: the wrong advice here.)
        cause = (
            next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) else exc
        )
        raise CheckpointCorrupt(
            f"{ckpt.path()}: tensor data does not load ({type(cause).__name__} reading "
            f"{batch[0].key}...); run `stockpot verify {ckpt.path()}` (--debug for details)"
        ) from exc
