"""The layout of one stored piece of a DCP checkpoint: where its tensor's raw bytes start.

DCP writes each tensor piece as `torch.save` of the tensor: a small zip whose records are the
pickle (`data.pkl`), the byte order, then the storage (`data/0`, 64-byte aligned), then a few
trailing records. For a plain piece (one contiguous little-endian tensor whose storage holds
exactly its elements, which is what DCP writes) the tensor is the bytes at `data_offset`, so a
reader can copy them straight into place (the restore, `load_piece`) or read them in byte
ranges (the soup, `plain_data_offset` and `decode_piece`) instead of `torch.load`ing the piece.
Anything else: None, and the piece is `torch.load(weights_only=True)`ed as DCP does.

The pickle is read by torch's weights_only unpickler with storages on the meta device, so
nothing but the layout is ever built from storage.
"""

from __future__ import annotations

import functools
import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.checkpoint.format.stored import Piece

HEAD_BYTES = 4096  # a torch.save piece's zip records before its tensor data fit in this


@dataclass(frozen=True)
class Layout:
    data_offset: int  # where the tensor's bytes start, from the piece's first byte
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_layout(head: bytes, length: int) -> Layout | None:
    """The layout of a plain piece of `length` bytes whose first bytes are `head`, else None."""
    records = _zip_records(head)
    pkl = next((at for name, at in records.items() if name.endswith("/data.pkl")), None)
    data = next((at for name, at in records.items() if name.endswith("/data/0")), None)
    if pkl is None or data is None or any(name.endswith("/data/1") for name in records):
        return None
    order = next((at for name, at in records.items() if name.endswith("/byteorder")), None)
    if order is not None and head[order : order + 6] != b"little":
        return None
    try:
        meta = _meta_tensor(_pickle_bytes(head, pkl))
    except Exception:  # anything unusual: the caller's torch.load handles (or names) it
        return None
    if not isinstance(meta, torch.Tensor):
        return None
    layout = Layout(data, meta.dtype, tuple(meta.shape))
    plain = (
        meta.is_contiguous()
        and meta.storage_offset() == 0
        and meta.untyped_storage().nbytes() == layout.nbytes
        and data + layout.nbytes <= length
    )
    return layout if plain else None


def plain_data_offset(head: bytes, piece: Piece, dtype: torch.dtype) -> int | None:
    """Where the raw bytes of a stored piece's tensor start within the piece, if the piece is
    what DCP writes for a plain tensor of the piece's shape and `dtype` (`tensor_layout`):
    then the piece can be read in byte ranges and viewed in place. None otherwise (read it
    whole, `decode_piece`). `head` is the piece's first bytes (HEAD_BYTES of them suffice)."""
    layout = tensor_layout(head, piece.length)
    if layout is None or layout.dtype != dtype or layout.shape != piece.shape:
        return None
    return layout.data_offset


def decode_piece(raw: memoryview, piece: Piece, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in a whole stored piece's bytes: a view of them when the piece is plain,
    else `torch.load(weights_only=True)`. ValueError (why, in a few words, for the caller to
    name the file and tensor) when they hold no tensor of the piece's shape."""
    at = plain_data_offset(bytes(raw[:HEAD_BYTES]), piece, dtype)
    count = math.prod(piece.shape)
    if at is not None and count == 0:
        return torch.empty(piece.shape, dtype=dtype)
    if at is not None:
        return torch.frombuffer(raw, dtype=dtype, count=count, offset=at).reshape(piece.shape)
    try:
        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or altered piece: the caller names it, never a traceback
        raise ValueError(type(exc).__name__) from None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != piece.shape:
        raise ValueError("not the piece its metadata declares")
    return tensor


def _zip_records(head: bytes) -> dict[str, int]:
    """Name -> offset of its data, for each zip local header found in `head`."""
    found: dict[str, int] = {}
    at = head.find(b"PK\x03\x04")
    while at >= 0 and at + 30 <= len(head):
        name_len, extra_len = struct.unpack_from("<HH", head, at + 26)
        name = head[at + 30 : at + 30 + name_len].decode("utf-8", "replace")
        found.setdefault(name, at + 30 + name_len + extra_len)
        at = head.find(b"PK\x03\x04", at + 4)
    return found


def _pickle_bytes(head: bytes, start: int) -> bytes:
    """The pickle of data.pkl: up to its STOP opcode, which ends the zip record's data."""
    end = head.find(b".PK\x07\x08", start)  # STOP, then the record's data descriptor
    return head[start : end + 1] if end >= 0 else head[start:]


@functools.lru_cache(maxsize=4096)
def _meta_tensor(pickled: bytes) -> object:
    """The tensor a piece's pickle describes, on the meta device (cached: pieces of one shape
    share one pickle, and the weights_only unpickler costs ~0.4 ms a call)."""
    from torch import _weights_only_unpickler

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")

    def persistent_load(saved_id: tuple[object, ...]) -> object:
        _, storage_type, key, _, numel = saved_id
        if key != "0":
            raise ValueError("a second storage")
        dtype = getattr(storage_type, "dtype", storage_type)
        assert isinstance(dtype, torch.dtype) and isinstance(numel, int)
        untyped = torch.UntypedStorage(numel * dtype.itemsize, device="meta")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()


def load_piece(
    stream: Any,
    offset: int,
    length: int,
    part: tuple[Sequence[int], Sequence[int]],
    target: torch.Tensor,
) -> None:
    """Fill `target` with the part (offsets, lengths per dim) of the piece stored at
    [offset, offset + length) of `stream`: straight from the stream into `target`'s memory when
    the piece is plain and `target` is all of it, laid out alike; else through a buffer."""
    stream.seek(offset)
    head = stream.read(min(HEAD_BYTES, length))
    layout = tensor_layout(head, length)
    offsets, lengths = part
    if layout is None:  # not what DCP writes for a plain tensor: as DCP reads it
        raw = head + stream.read(length - len(head))
        stored = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    else:
        whole = all(o == 0 for o in offsets) and tuple(lengths) == layout.shape
        same = (target.dtype == layout.dtype and tuple(target.shape) == layout.shape
                and target.device.type == "cpu" and target.is_contiguous())  # fmt: skip
        if whole and same:
            _read_into(stream, head[layout.data_offset :], target)
            return
        buf = bytearray(layout.nbytes)
        _read_into(stream, head[layout.data_offset :], torch.frombuffer(buf, dtype=torch.uint8))
        stored = torch.frombuffer(buf, dtype=layout.dtype).view(layout.shape) if buf else (
            torch.empty(layout.shape, dtype=layout.dtype)
        )  # fmt: skip
    for dim, (start, size) in enumerate(zip(offsets, lengths, strict=True)):
        stored = stored.narrow(dim, start, size)
    if stored.shape != target.shape:
        raise ValueError(f"stored piece is {tuple(stored.shape)}, expected {tuple(target.shape)}")
    target.copy_(stored)


def _read_into(stream: Any, head: bytes, target: torch.Tensor) -> None:
    """`target`'s bytes: those already in `head`, then the rest read from `stream`."""
    if target.numel() == 0:
        return
    view = target.reshape(-1).view(torch.uint8).numpy().data
    n = min(len(head), len(view))
    view[:n] = head[:n]
    while n < len(view):
        got = stream.readinto(view[n:])
        if not got:
            raise EOFError(f"a checkpoint file ended {len(view) - n} bytes early")
        n += got
