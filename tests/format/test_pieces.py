"""Reading one stored DCP piece (checkpoint/format/pieces.py): straight into place when plain, through
`torch.load` otherwise, a part of it when resharding, and a clear error when it is cut short."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.format import (
    Piece,
    decode_piece,
    load_shards,
    plain_data_offset,
    save_shards,
    tensor_layout,
)
from orchestrator.checkpoint.format.pieces import load_piece
from orchestrator.errors import CheckpointCorrupt
from orchestrator.storage import Store


def _stored(t: torch.Tensor, pad: int = 100) -> tuple[io.BytesIO, int, int]:
    """A stream holding `pad` other bytes, then torch.save(t): (stream, offset, length)."""
    piece = io.BytesIO()
    torch.save(t, piece)
    raw = piece.getvalue()
    return io.BytesIO(b"x" * pad + raw + b"y" * pad), pad, len(raw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_a_plain_piece_lands_in_place(dtype: torch.dtype) -> None:
    t = (torch.arange(3 * 2000) - 7).to(dtype).reshape(3, 2000)  # bigger than the head read
    stream, at, length = _stored(t)
    layout = tensor_layout(stream.getvalue()[at : at + 4096], length)
    assert layout is not None and layout.shape == (3, 2000) and layout.dtype == dtype
    target = torch.zeros_like(t)
    address = target.data_ptr()
    load_piece(stream, at, length, ([0, 0], [3, 2000]), target)
    assert torch.equal(target, t) and target.data_ptr() == address


def test_plain_pieces_are_found_and_anything_else_is_not() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    raw = _stored(t, pad=0)[0].getvalue()
    piece = Piece("f", 0, len(raw), (0, 0), (3, 4))
    at = plain_data_offset(raw[:4096], piece, torch.float32)
    assert at is not None and raw[at : at + 48] == t.numpy().tobytes()
    assert torch.equal(decode_piece(memoryview(bytearray(raw)), piece, torch.float32), t)
    transposed = torch.arange(12, dtype=torch.float32).reshape(4, 3).t()  # a strided view
    strided = _stored(transposed, pad=0)[0].getvalue()
    assert plain_data_offset(strided, piece, torch.float32) is None
    assert torch.equal(
        decode_piece(memoryview(bytearray(strided)), piece, torch.float32), transposed
    )
    view = torch.arange(24, dtype=torch.float32)[12:].reshape(3, 4)  # storage holds more
    assert plain_data_offset(_stored(view, pad=0)[0].getvalue(), piece, torch.float32) is None
    assert plain_data_offset(raw, piece, torch.float64) is None
    assert plain_data_offset(b"not a zip at all", piece, torch.float32) is None
    with pytest.raises(ValueError, match="not the piece its metadata declares"):
        decode_piece(
            memoryview(bytearray(raw)), Piece("f", 0, len(raw), (0, 0), (4, 3)), torch.float32
        )


def test_a_part_of_a_piece_for_another_sharding() -> None:
    t = torch.arange(40.0).reshape(8, 5)
    stream, at, length = _stored(t)
    target = torch.zeros(3, 5)
    load_piece(stream, at, length, ([2, 0], [3, 5]), target)
    assert torch.equal(target, t[2:5])
    strided = torch.zeros(5, 8).t()  # not contiguous: goes through a buffer, still exact
    load_piece(stream, at, length, ([0, 0], [8, 5]), strided)
    assert torch.equal(strided, t)


def test_a_piece_that_is_not_plain_is_torch_loaded() -> None:
    view = torch.arange(20.0)[5:9]  # its storage holds more than its elements
    stream, at, length = _stored(view)
    assert tensor_layout(stream.getvalue()[at:], length) is None
    target = torch.zeros(4)
    load_piece(stream, at, length, ([0], [4]), target)
    assert torch.equal(target, view)


def test_a_piece_cut_short_is_an_error() -> None:
    t = torch.arange(10000.0)
    stream, at, length = _stored(t, pad=0)
    short = io.BytesIO(stream.getvalue()[: length - 5000])
    with pytest.raises(EOFError, match=r"ended 4[0-9]+ bytes early"):
        load_piece(short, at, length, ([0], [10000]), torch.zeros(10000))


def test_restore_names_the_file_a_piece_is_cut_short_in(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    w = torch.arange(12000.0).reshape(3, 4000)
    assert save_shards({"w": w}, store, "c")
    state = {"w": torch.zeros(3, 4000)}
    load_shards(state, store, "c")
    assert torch.equal(state["w"], w)
    data = next(p for p in (tmp_path / "c").iterdir() if p.name.endswith("_0.distcp"))
    raw = bytearray(data.read_bytes())
    data.write_bytes(bytes(raw[: len(raw) // 2]))  # the file ends inside the tensor
    with pytest.raises(CheckpointCorrupt, match=r"_0\.distcp: w: a checkpoint file ended"):
        load_shards({"w": torch.zeros(3, 4000)}, store, "c")
