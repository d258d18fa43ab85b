"""`stockpot export` of one checkpoint to safetensors: bit-equal plain names, refusals that
leave nothing behind, --out and --prefix checks, every dtype; and choose_prefix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file
from torch import nn

from launch.cli import main
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.weights import choose_prefix
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store
from tests.inspect_cli.saved_run import (
    PLAIN_NAMES,
    Run,
    assert_bit_equal,
    one_line_error,
    stockpot,
)


def test_export_writes_plain_names_bit_equal(run: Run, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "model.safetensors"
    out = stockpot("export", run.ckpt(2), "--out", dst)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # no tqdm off a TTY, no torch warnings
    assert os.listdir(dst.parent) == ["model.safetensors"]  # no temp file left behind
    tensors = load_file(dst)
    assert set(tensors) == PLAIN_NAMES
    assert_bit_equal(tensors, run.weights)
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "2", "source": str(run.ckpt(2))}


def test_export_refuses_a_corrupt_checkpoint(run: Run, tmp_path: Path) -> None:
    shard = run.shard(2)
    shard.write_bytes(shard.read_bytes()[:-1])  # sizes are checked before anything is read
    dst = tmp_path / "out" / "model.safetensors"
    out = stockpot("export", run.ckpt(2), "--out", dst)
    assert out.returncode == 3
    assert str(shard) in one_line_error(out) and "refusing to export" in out.stderr
    assert not dst.parent.exists()


def test_export_leaves_nothing_when_the_data_does_not_load(run: Run, tmp_path: Path) -> None:
    shard = run.shard(2)
    shard.write_bytes(bytes(shard.stat().st_size))  # right size, garbage content
    dst = tmp_path / "model.safetensors"
    out = stockpot("export", run.ckpt(2), "--out", dst)
    assert out.returncode == 3
    assert "stockpot verify" in one_line_error(out)
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("name", ["model.pt", "model", "model.safetensors.tmp"])
def test_export_bad_out_suffix_exits_2(run: Run, tmp_path: Path, name: str) -> None:
    out = stockpot("export", run.ckpt(2), "--out", tmp_path / name)
    assert out.returncode == 2
    assert "--out must name a .safetensors file, e.g. --out" in one_line_error(out)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_export_of_a_run_dir_points_at_its_checkpoints(run: Run, tmp_path: Path) -> None:
    out = stockpot("export", run.path, "--out", tmp_path / "m.safetensors")
    assert out.returncode == 2 and "pass one of its checkpoints/step-*" in one_line_error(out)


# In-process (the same `main`): cases that would otherwise each pay a torch import.


def test_export_with_two_models_needs_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(2, 2), nn.Linear(3, 1)
    ckpt = Checkpointer(Store(str(tmp_path / "run")))
    ckpt.register("student", ModelAndOptimizer(a))
    ckpt.register("teacher", ModelAndOptimizer(b))
    ckpt.save(3)
    src = tmp_path / "run" / "checkpoints" / "step-000000003"
    dst = tmp_path / "m.safetensors"
    assert main(["export", str(src), "--out", str(dst)]) == 2
    assert (
        "prefixes: student.model., teacher.model.; choose one with --prefix"
        in capsys.readouterr().err
    )
    assert main(["export", str(src), "--out", str(dst), "--prefix", "teacher.model"]) == 0
    assert_bit_equal(load_file(dst), {k: v.detach() for k, v in b.state_dict().items()})


def test_export_keeps_every_dtype(tmp_path: Path) -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.low = nn.Linear(3, 5).to(torch.bfloat16)
            self.norm = nn.BatchNorm1d(3)  # num_batches_tracked: a 0-d int64
            self.register_buffer("mask", torch.tensor([True, False, True]))
            self.register_buffer("empty", torch.zeros(0, 4, dtype=torch.float16))

    model = Mixed()
    ckpt = Checkpointer(Store(str(tmp_path / "run")))
    ckpt.register("train", ModelAndOptimizer(model))
    ckpt.save(1)
    dst = tmp_path / "m.safetensors"
    src = tmp_path / "run" / "checkpoints" / "step-000000001"
    assert main(["export", str(src), "--out", str(dst)]) == 0
    raw = dst.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0  # tensors start aligned
    assert_bit_equal(load(raw), {k: v.detach() for k, v in model.state_dict().items()})


def test_choose_prefix() -> None:
    keys = dict.fromkeys(["train.model.w", "train.optim.state.0.x", "ema.model.w", "rng.x"])
    assert choose_prefix(keys, "ema.model.") == "ema.model."
    with pytest.raises(
        Exception, match=r"prefixes: ema.model., train.model.; choose one with --prefix"
    ):
        choose_prefix(keys, "auto")
    assert choose_prefix({"train.model.w": None, "train.optim.x": None}, "auto") == "train.model."
    with pytest.raises(Exception, match=r"top-level prefixes: a., b.; choose one"):
        choose_prefix({"a.x": None, "b.y": None}, "auto")
    with pytest.raises(Exception, match=r"no tensors under --prefix 'nope.'"):
        choose_prefix(keys, "nope")
