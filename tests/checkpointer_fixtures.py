"""The in-process Checkpointer tests' model, stores and shortcuts (single process, no group)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.nn as nn

from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.format import MANIFEST_NAME
from orchestrator.state import ModelAndOptimizer, RNGState
from orchestrator.storage import Store


class GatedStore(Store):
    """A real Store whose manifest writes wait for a gate (or fail), to hold a commit open."""

    def __init__(
        self, url: str, gate: threading.Event | threading.Barrier | None = None, fail: bool = False
    ) -> None:
        super().__init__(url)
        self.gate, self.fail = gate, fail

    def write_bytes(self, rel: str, data: bytes, *, create_only: bool = False) -> None:
        if rel.endswith(MANIFEST_NAME):
            if self.fail:
                raise OSError("injected: disk on fire")
            if isinstance(self.gate, threading.Barrier):
                self.gate.wait(timeout=60)
            elif self.gate is not None:
                assert self.gate.wait(timeout=60)
        super().write_bytes(rel, data, create_only=create_only)


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model and its optimizer, the same every call (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()


def checkpointer(
    store: Store, model: nn.Module, optim: torch.optim.Optimizer, **kw
) -> Checkpointer:
    ckpt = Checkpointer(store, **kw)
    ckpt.register("train", ModelAndOptimizer(model, optim))
    ckpt.register("rng", RNGState(), per_rank=True)
    return ckpt


def fresh_restore(url: str, **kw) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """A new model restored from `url` (restore's kwargs): model, optimizer, what was loaded."""
    model, optim = model_and_optimizer()
    with torch.no_grad():
        model[0].weight.add_(1.0)  # differs from anything saved
    ckpt = checkpointer(Store(url), model, optim)
    return model, optim, ckpt.restore(**kw)


def flip_a_byte(step_dir: Path) -> Path:
    """Flip one bit in the middle of a shard of `step_dir`; the shard's path."""
    shard = next(step_dir.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard
