"""The shard writer (checkpoint/format/dcp_write.py): each tensor piece is torch.save's bytes, written
from the tensor's memory without torch.save's CRC pass, so torch.load, DCP's own reader and
ours read what it wrote; tensors torch.save lays out differently take torch.save itself."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from orchestrator.checkpoint.format import save_shards, tensor_layout
from orchestrator.checkpoint.format.dcp_write import _cpu_piece, write_tensor
from orchestrator.checkpoint.format.pieces import _zip_records
from orchestrator.storage import Store

TENSORS = {
    "f32": torch.randn(3, 5),
    "bf16": torch.randn(7).to(torch.bfloat16),
    "i64": torch.arange(-5, 5),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
    "big": torch.randn(1000, 300),
    "transposed": torch.randn(6, 4).t(),  # a view: its own bytes only (_cpu_piece)
    "row": torch.randn(10, 10)[3],
}


@pytest.mark.parametrize("name", list(TENSORS))
def test_a_piece_is_torch_saves_bytes_and_loads_back(name: str) -> None:
    t = _cpu_piece(TENSORS[name])
    ours, theirs = io.BytesIO(), io.BytesIO()
    write_tensor(ours, t)
    torch.save(t, theirs)
    mine, ref = ours.getvalue(), theirs.getvalue()
    assert len(mine) == len(ref)
    at = next(at for name, at in _zip_records(ref[:4096]).items() if name.endswith("/data/0"))
    assert mine[:at] == ref[:at], "the records before the data are torch.save's"
    assert mine[at : at + t.nbytes] == ref[at : at + t.nbytes]
    if t.is_contiguous():  # what the copy-free readers take (pieces.py)
        layout = tensor_layout(mine[:4096], len(mine))
        assert layout is not None and (layout.data_offset, layout.shape) == (at, tuple(t.shape))
    ours.seek(0)
    back = torch.load(ours, weights_only=True)
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


def test_a_tensor_torch_saves_differently_takes_torch_save() -> None:
    sparse = torch.eye(4).to_sparse()
    ours = io.BytesIO()
    write_tensor(ours, sparse)
    ours.seek(0)
    assert torch.equal(torch.load(ours, weights_only=True).to_dense(), torch.eye(4))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_saved_checkpoint_loads_with_plain_dcp(tmp_path: Path) -> None:
    """What a user without stockpot does: dcp.load with DCP's default FileSystemReader."""
    state = {f"model.{k}": _cpu_piece(v) for k, v in TENSORS.items()}
    state["train.optim.state.0.exp_avg"] = torch.randn(64, 64)  # the optimizer file (layout.py)
    state["note"] = "a byte item"  # written by torch.save as bytes, ahead of the tensors
    save_shards(state, Store(str(tmp_path)), "ckpt")
    back = {k: torch.full_like(v, 3) if isinstance(v, torch.Tensor) else None
            for k, v in state.items()}  # fmt: skip
    back["note"] = ""
    dcp.load(back, storage_reader=FileSystemReader(str(tmp_path / "ckpt")), no_dist=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(back[key], value), key
    assert back["note"] == state["note"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        ".metadata", "__0_0.distcp", "__0_optim.distcp"
    ]  # fmt: skip
