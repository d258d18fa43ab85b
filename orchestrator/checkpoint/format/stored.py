"""What a reader learns of a stored model before reading its data: each tensor's dtype and shape,
and the pieces it is stored in (one byte range of one file each, placed somewhere in the full
tensor).

Both stored formats are described alike: a DCP checkpoint (`index.stored_items`, from DCP's
`.metadata`: one piece per shard that was saved, each a small `torch.save` zip, pieces.py) and
a safetensors file (`safetensors_codec.read_safetensors_index`: one piece per tensor, its raw
bytes). No torch import: these are plain records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Piece:
    file: str  # relative to the store that was indexed (a checkpoint's data dir included)
    offset: int  # byte range of the stored piece in `file`
    length: int
    at: tuple[int, ...]  # where the piece starts in the full tensor
    shape: tuple[int, ...]  # the piece's own shape


@dataclass(frozen=True)
class StoredTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    # DCP's transform descriptors of any piece (e.g. compression): such a piece is not
    # torch.save's bytes alone, and only DCP's own loader reads it.
    transforms: tuple[str, ...] = ()
