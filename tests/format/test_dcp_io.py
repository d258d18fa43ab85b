"""The DCP wall (checkpoint/format/dcp_io.py, index.py): what a checkpoint holds, read from its
`.metadata` without DCP types leaking out, and what leaves when DCP fails: our own one-line
errors, never DCP's CheckpointException (a BaseException with a traceback per rank)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.format import (
    METADATA_NAME,
    decode_piece,
    load_flat,
    load_shards,
    save_shards,
    stored_items,
)
from orchestrator.checkpoint.format import pieces as pieces_module
from orchestrator.errors import CheckpointCorrupt, CheckpointError
from orchestrator.storage import Store

STATE = {
    "train.model.w": torch.randn(3, 5),
    "train.model.n": torch.arange(4),
    "train.optim.state.0.exp_avg": torch.randn(3, 5),
    "note": "an object, saved as bytes",
}


@pytest.fixture
def saved(tmp_path: Path) -> Store:
    store = Store(str(tmp_path))
    save_shards(STATE, store, "ckpt/data")
    return store


def test_the_index_lists_every_key_and_where_each_piece_is(saved: Store, tmp_path: Path) -> None:
    items = stored_items(saved, "ckpt/data")
    assert set(items) == set(STATE) and items["note"] is None
    assert (tmp_path / "ckpt/data" / METADATA_NAME).is_file()
    files = {}
    for key in ("train.model.w", "train.model.n", "train.optim.state.0.exp_avg"):
        stored = items[key]
        assert stored is not None and stored.transforms == ()
        assert (stored.dtype, stored.shape) == (STATE[key].dtype, tuple(STATE[key].shape))
        (piece,) = stored.pieces  # one process saved it: one piece, the whole tensor
        assert (piece.at, piece.shape) == ((0,) * len(stored.shape), stored.shape)
        raw = (tmp_path / piece.file).read_bytes()[piece.offset : piece.offset + piece.length]
        assert torch.equal(
            decode_piece(memoryview(bytearray(raw)), piece, stored.dtype), STATE[key]
        )
        files[key] = piece.file
    assert files["train.model.w"] == files["train.model.n"] == "ckpt/data/__0_0.distcp"
    assert files["train.optim.state.0.exp_avg"] == "ckpt/data/__0_optim.distcp"


def test_random_bytes_for_metadata_are_corrupt(saved: Store, tmp_path: Path) -> None:
    (tmp_path / "ckpt/data" / METADATA_NAME).write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointCorrupt, match=r"\.metadata: unreadable DCP metadata"):
        stored_items(saved, "ckpt/data")


def test_a_state_the_checkpoint_does_not_fit_is_one_line(saved: Store) -> None:
    wrong = {"train.model.w": torch.zeros(5, 3)}
    with pytest.raises(CheckpointError, match=r"^loading .*ckpt/data failed \(rank 0\): ") as got:
        load_shards(wrong, saved, "ckpt/data")
    assert "\n" not in str(got.value)
    assert set(load_flat(saved, "ckpt/data", ["note", "train.model.n"])) == {
        "note",
        "train.model.n",
    }


def test_a_failed_write_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"a file where the checkpoint dir goes")
    with pytest.raises(CheckpointError, match=r"^writing .*taken/ckpt failed \(rank 0\): ") as got:
        save_shards(STATE, Store(str(tmp_path)), "taken/ckpt")
    assert "\n" not in str(got.value)


def test_an_interrupt_inside_dcp_stays_an_interrupt(saved: Store, monkeypatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pieces_module, "load_piece", interrupted)
    with pytest.raises(BaseException) as got:
        load_shards({"train.model.w": torch.zeros(3, 5)}, saved, "ckpt/data")
    assert not isinstance(got.value, Exception), "an `except Exception` would swallow it"


class _RunsCode:
    """Unpickled, it would create a directory: what a tampered checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return os.mkdir, (str(self.marker),)


def test_a_byte_item_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    """DCP's own planner unpickles byte items with weights_only=False; ours never does."""
    marker = tmp_path / "ran"
    store = Store(str(tmp_path))
    save_shards({"w": torch.ones(2), "evil": _RunsCode(marker)}, store, "ckpt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"[Ww]eights only load failed|Unsupported"):
        load_shards({"w": torch.zeros(2), "evil": None}, store, "ckpt")
    assert not marker.exists(), "the pickle ran"
    with pytest.raises(CheckpointError):
        load_flat(store, "ckpt", ["evil"])
    assert not marker.exists()
    state = {"w": torch.zeros(2)}
    load_shards(state, store, "ckpt")  # the tensors alone load
    assert torch.equal(state["w"], torch.ones(2))
