"""The checkpoint format: every fact about the bytes on disk, and the only user of torch's
private APIs and of torch.distributed.checkpoint's internals.

A torch upgrade or a format change lands here and nowhere else; the byte-pinning tests sit in
tests/format/. Import from the package (`from orchestrator.checkpoint import format as fmt`),
never from its modules (only tests reach inside: the pinning tests, and fault injection that
stalls the shard writer):

- names (layout.py): `CHECKPOINTS_DIR`, `MANIFEST_NAME`, `METADATA_NAME`, `TMP_PREFIX`,
  `MODEL_KEY`, `OPTIM_KEY`, `step_dirname`, `step_rel`, `parse_step_dirname`,
  `rank_state_name`, `is_optimizer_item`, `optimizer_file_name`, `is_optimizer_file`,
  `SHARD_SUFFIX`, `is_shard_file`
- the commit record (manifest.py): `Manifest`, `FileEntry`, `CHECKSUM_ALGORITHM`, `Hasher`,
  `HashingReader`, `hash_bytes`, `hash_stream`, `check_confined`, `library_versions`
- per-rank state as JSON (rank_state.py): `encode_rank_state`, `decode_rank_state`
- DCP shards (dcp_io.py, dcp_write.py): `save_shards`, `load_shards`, `load_flat`, `DiskFull`,
  `Tap` (a load that verifies what it reads), `LazyTensors` (what a background save's lazy
  copy offers the writer)
- what a checkpoint stores (index.py, stored.py): `stored_items`, `StoredTensor`, `Piece`
- one stored piece (pieces.py): `HEAD_BYTES`, `Layout`, `tensor_layout`, `plain_data_offset`,
  `decode_piece`
- safetensors (safetensors_codec.py): `DTYPE_CODES`, `DTYPE_NAMES`, `dtype_name`,
  `torch_dtype`, `TensorEntry`, `Sink`, `Loader`, `BATCH_BYTES`, `SAFETENSORS_SUFFIX`,
  `safetensors_header`, `batches`, `write_safetensors`, `write_safetensors_parts`,
  `raw_bytes`, `entry_for`, `read_safetensors_index`

The names, the manifest and the safetensors codec import no torch, so `launch/` can use them
and still start fast; the rest is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from orchestrator.checkpoint.format.layout import (
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    METADATA_NAME,
    MODEL_KEY,
    OPTIM_KEY,
    SHARD_SUFFIX,
    TMP_PREFIX,
    is_optimizer_file,
    is_optimizer_item,
    is_shard_file,
    optimizer_file_name,
    parse_step_dirname,
    rank_state_name,
    step_dirname,
    step_rel,
)
from orchestrator.checkpoint.format.manifest import (
    CHECKSUM_ALGORITHM,
    FileEntry,
    Hasher,
    HashingReader,
    Manifest,
    check_confined,
    hash_bytes,
    hash_stream,
    library_versions,
)
from orchestrator.checkpoint.format.safetensors_codec import (
    BATCH_BYTES,
    DTYPE_CODES,
    DTYPE_NAMES,
    SAFETENSORS_SUFFIX,
    Loader,
    Sink,
    TensorEntry,
    batches,
    dtype_name,
    entry_for,
    raw_bytes,
    read_safetensors_index,
    safetensors_header,
    torch_dtype,
    write_safetensors,
    write_safetensors_parts,
)
from orchestrator.checkpoint.format.stored import Piece, StoredTensor

if TYPE_CHECKING:  # imported on first use (torch, DCP): see __getattr__
    from orchestrator.checkpoint.format.dcp_io import (
        DiskFull,
        Tap,
        Unreachable,
        load_flat,
        load_shards,
        needed_files,
        read_metadata,
        save_shards,
    )
    from orchestrator.checkpoint.format.dcp_write import LazyTensors
    from orchestrator.checkpoint.format.index import stored_items
    from orchestrator.checkpoint.format.pieces import (
        HEAD_BYTES,
        Layout,
        decode_piece,
        plain_data_offset,
        tensor_layout,
    )
    from orchestrator.checkpoint.format.rank_state import decode_rank_state, encode_rank_state

_LAZY = {
    "DiskFull": "dcp_io",
    "load_flat": "dcp_io",
    "load_shards": "dcp_io",
    "needed_files": "dcp_io",
    "read_metadata": "dcp_io",
    "Tap": "dcp_io",
    "Unreachable": "dcp_io",
    "save_shards": "dcp_io",
    "LazyTensors": "dcp_write",
    "stored_items": "index",
    "HEAD_BYTES": "pieces",
    "Layout": "pieces",
    "decode_piece": "pieces",
    "plain_data_offset": "pieces",
    "tensor_layout": "pieces",
    "decode_rank_state": "rank_state",
    "encode_rank_state": "rank_state",
}

__all__ = [
    "BATCH_BYTES",
    "CHECKPOINTS_DIR",
    "CHECKSUM_ALGORITHM",
    "DTYPE_CODES",
    "DTYPE_NAMES",
    "HEAD_BYTES",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "MODEL_KEY",
    "OPTIM_KEY",
    "SAFETENSORS_SUFFIX",
    "SHARD_SUFFIX",
    "TMP_PREFIX",
    "DiskFull",
    "FileEntry",
    "Hasher",
    "HashingReader",
    "Layout",
    "LazyTensors",
    "Loader",
    "Manifest",
    "Piece",
    "Sink",
    "StoredTensor",
    "Tap",
    "TensorEntry",
    "Unreachable",
    "batches",
    "check_confined",
    "decode_piece",
    "decode_rank_state",
    "dtype_name",
    "encode_rank_state",
    "entry_for",
    "hash_bytes",
    "hash_stream",
    "is_optimizer_file",
    "is_optimizer_item",
    "is_shard_file",
    "library_versions",
    "load_flat",
    "load_shards",
    "needed_files",
    "optimizer_file_name",
    "parse_step_dirname",
    "plain_data_offset",
    "rank_state_name",
    "raw_bytes",
    "read_metadata",
    "read_safetensors_index",
    "safetensors_header",
    "save_shards",
    "step_dirname",
    "step_rel",
    "stored_items",
    "tensor_layout",
    "torch_dtype",
    "write_safetensors",
    "write_safetensors_parts",
]


def __getattr__(name: str) -> Any:
    """The torch-importing part of the API, imported when first asked for (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
