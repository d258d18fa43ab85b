"""What a DCP checkpoint holds, from its `.metadata`: every flat key, and for each tensor its
dtype, shape and stored pieces, so a reader that is not DCP's (the soup, export) knows which
byte ranges to read without DCP types leaking out.

A tensor saved by one rank (DDP, or a tool) is one piece; an FSDP-sharded one is one piece per
shard, each placed at its offset in the full tensor. Pieces are named by their file relative
to the checkpoint directory (its manifest's data dir included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from orchestrator.checkpoint.format.dcp_io import read_metadata
from orchestrator.checkpoint.format.stored import Piece, StoredTensor

if TYPE_CHECKING:
    from orchestrator.storage import Store


def stored_items(store: Store, rel: str = "") -> dict[str, StoredTensor | None]:
    """Every flat key of the DCP files under `rel` of `store` (a checkpoint's data dir), in
    saved order: its tensor (pieces named relative to `store`), or None for an object saved
    as bytes. CheckpointCorrupt if `.metadata` is not DCP metadata."""
    md = read_metadata(store, rel)
    pieces: dict[str, list[Piece]] = {}
    transforms: dict[str, list[str]] = {}
    for index, info in md.storage_data.items():
        meta = md.state_dict_metadata.get(index.fqn)
        if not isinstance(meta, TensorStorageMetadata):
            continue
        chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset))
        file = f"{rel}/{info.relative_path}" if rel else info.relative_path
        piece = Piece(file, info.offset, info.length, tuple(chunk.offsets), tuple(chunk.sizes))
        pieces.setdefault(index.fqn, []).append(piece)
        transforms.setdefault(index.fqn, []).extend(info.transform_descriptors or ())
    return {
        key: StoredTensor(
            meta.properties.dtype,
            tuple(meta.size),
            tuple(pieces.get(key, ())),
            tuple(dict.fromkeys(transforms.get(key, ()))),
        )
        if isinstance(meta, TensorStorageMetadata)
        else None
        for key, meta in md.state_dict_metadata.items()
    }
