"""A run saved by the real Checkpointer in this process (single process, no group), the
console script to point at it, ways to damage it, and the checks the status, verify, export
and S3 tests share."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.state import ModelAndOptimizer, RNGState
from orchestrator.storage import Store

REPO = Path(__file__).resolve().parents[2]  # tests/inspect_cli/ -> the repo root
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
STEPS = (1, 2)
PLAIN_NAMES = {"0.weight", "0.bias", "2.weight", "2.bias"}


def stockpot(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STOCKPOT, *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def train_and_save(run: Store, steps: tuple[int, ...] = STEPS) -> dict[str, torch.Tensor]:
    """Train a tiny model, checkpoint after each step; the weights at the last save."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt = Checkpointer(run)
    ckpt.register("train", ModelAndOptimizer(model, optim))
    ckpt.register("rng", RNGState(), per_rank=True)
    for step in steps:
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        ckpt.save(step, metrics={"loss": float(loss.detach()), "lr": 0.1})
    ckpt.close()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Run:
    path: Path
    weights: dict[str, torch.Tensor]  # the model at the last save (step 2)
    t0: float

    def ckpt(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step:09d}"

    def shard(self, step: int) -> Path:
        (shard,) = self.ckpt(step).rglob("*_0.distcp")  # the model part
        return shard


def add_leftovers(run: Run) -> tuple[Path, Path]:
    uncommitted = run.path / "checkpoints" / "step-000000099"
    uncommitted.mkdir()
    shutil.copy(run.shard(2), uncommitted / "__0_0.distcp")  # a shard, but no manifest
    tmp = run.path / "checkpoints" / ".tmp-step-000000100-0123abcd"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    return uncommitted, tmp


def add_escaping_manifest(run: Run) -> Path:
    """step 7 whose manifest names `../x`: corrupt, never a checkpoint."""
    bad = run.ckpt(7)
    bad.mkdir()
    body = json.loads((run.ckpt(1) / "MANIFEST.json").read_text())
    body["step"] = 7
    body["files"]["../x"] = {"size": 1, "checksum": "0" * 32}
    (bad / "MANIFEST.json").write_text(json.dumps(body))
    return bad


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    return out.stderr


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert (
            got[name].reshape(-1).view(torch.uint8).equal(tensor.reshape(-1).view(torch.uint8))
        ), name
