"""The safetensors codec (checkpoint/format/safetensors_codec.py): every dtype of its one table
round-trips through our writer and the reference reader (`safetensors.torch.load`), and
through our header reader; files written by the reference writer index the same way."""

from __future__ import annotations

import io
import struct

import pytest
import torch
from safetensors.torch import load, save

from orchestrator.checkpoint.format import (
    DTYPE_CODES,
    DTYPE_NAMES,
    dtype_name,
    entry_for,
    read_safetensors_index,
    safetensors_header,
    torch_dtype,
    write_safetensors,
    write_safetensors_parts,
)
from orchestrator.errors import CheckpointCorrupt, StockpotError, UsageError


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    """Distinct bytes in every element (so a misplaced byte shows), viewed as `dtype`."""
    n = torch.Size(shape).numel()
    raw = (torch.arange(n * dtype.itemsize) * 37 % 251).to(torch.uint8)
    if dtype == torch.bool:
        return (raw[:n] % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as stored (NaN bit patterns of float8 included), dtype and shape alike."""
    raw = [bytes(t.reshape(-1).contiguous().view(torch.uint8).numpy()) for t in (a, b)]
    return (a.dtype, a.shape) == (b.dtype, b.shape) and raw[0] == raw[1]


def _written(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    entries = [entry_for(name, t) for name, t in tensors.items()]
    write_safetensors(out, entries, lambda batch: {e.key: tensors[e.key] for e in batch},
                      metadata or {}, batch_bytes=64)  # fmt: skip
    return out.getvalue()


def _read_back(raw: bytes) -> dict[str, torch.Tensor]:
    """Every tensor of a file, through our index: each one piece, its raw bytes."""
    found = read_safetensors_index(io.BytesIO(raw), "m.safetensors", "m.safetensors")
    back = {}
    for name, stored in found.items():
        (piece,) = stored.pieces
        zero = (0,) * len(stored.shape)
        assert (piece.file, piece.at, piece.shape) == ("m.safetensors", zero, stored.shape)
        data = bytearray(raw[piece.offset : piece.offset + piece.length])
        flat = (
            torch.frombuffer(data, dtype=stored.dtype)
            if data
            else torch.empty(0, dtype=stored.dtype)
        )
        back[name] = flat.reshape(stored.shape)
    return back


def test_the_table_is_one_table_read_both_ways() -> None:
    assert len(DTYPE_CODES) == len(DTYPE_NAMES)
    for name, code in DTYPE_CODES.items():
        assert DTYPE_NAMES[code] == name
        assert dtype_name(torch_dtype(code)) == name


@pytest.mark.parametrize("code", sorted(DTYPE_NAMES))
def test_each_dtype_round_trips_through_ours_and_the_reference(code: str) -> None:
    t = _sample(torch_dtype(code))
    raw = _written({"w": t, "scalar": t.reshape(-1)[0].clone(), "empty": t[:0]}, {"k": "v"})
    for back in (load(raw), _read_back(raw)):
        assert _same_bytes(back["w"], t)
        assert _same_bytes(back["scalar"], t.reshape(-1)[0])
        assert _same_bytes(back["empty"], t[:0])


def test_a_reference_file_indexes_like_ours() -> None:
    tensors = {f"t.{code}": _sample(torch_dtype(code), (2, 4)) for code in DTYPE_NAMES}
    raw = save(tensors, {"format": "pt"})
    back = _read_back(raw)
    assert set(back) == set(tensors)
    assert all(_same_bytes(back[k], v) for k, v in tensors.items())


def test_the_header_is_padded_and_every_tensor_aligned() -> None:
    tensors = {"a": _sample(torch.uint8, (3,)), "b": _sample(torch.float64, (2,)),
               "c": _sample(torch.bfloat16, (5,))}  # fmt: skip
    header, ordered = safetensors_header([entry_for(k, v) for k, v in tensors.items()], {})
    (size,) = struct.unpack("<Q", header[:8])
    assert len(header) == 8 + size and len(header) % 8 == 0
    assert [e.name for e in ordered] == ["b", "c", "a"]  # largest item first, then by name
    found = read_safetensors_index(io.BytesIO(header), "f", "f")
    assert all(s.pieces[0].offset % s.dtype.itemsize == 0 for s in found.values())


def test_parts_write_the_same_bytes_as_whole_tensors() -> None:
    tensors = {"w": _sample(torch.float32, (4, 6)), "b": _sample(torch.int16, (7,))}
    entries = [entry_for(k, v) for k, v in tensors.items()]
    out = io.BytesIO()
    write_safetensors_parts(out, entries, lambda e: tensors[e.name].reshape(-1).split(5), {})
    assert out.getvalue() == _written(tensors)
    short = io.BytesIO()
    with pytest.raises(CheckpointCorrupt, match="w: 40 bytes made, 96 declared"):
        write_safetensors_parts(short, entries, lambda e: [tensors[e.name].reshape(-1)[:10]], {})


def test_what_safetensors_cannot_hold_or_is_no_safetensors_file_is_refused() -> None:
    with pytest.raises(StockpotError, match="w has dtype complex128, which safetensors cannot"):
        entry_for("w", torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(CheckpointCorrupt, match=r"x\.safetensors: not a safetensors file"):
        read_safetensors_index(io.BytesIO(b"\xff" * 16), "x", "x.safetensors")
    with pytest.raises(CheckpointCorrupt, match="not a safetensors file"):
        read_safetensors_index(io.BytesIO(struct.pack("<Q", 4) + b"{no}"), "x", "x")
    body = b'{"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(UsageError, match="x: w has dtype Q7"):
        read_safetensors_index(io.BytesIO(struct.pack("<Q", len(body)) + body), "x", "x")
