"""Users' own training scripts for tests/test_api.py, run as entry points by real ranks."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import orchestrator


class Counter:
    """A user's own object saved with every checkpoint (e.g. an EMA, a curriculum)."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def manual(cfg: Any) -> None:
    """A loop of its own: restore(), then maybe_save() and should_stop() after each step."""
    with orchestrator.training(cfg) as t:
        model = t.wrap(nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.2), nn.Linear(32, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        counter = Counter()
        t.register(model=model, optimizer=optimizer, counter=counter)
        step = t.restore()
        while step < t.max_steps:
            g = torch.Generator().manual_seed(step * 1000 + t.rank)  # data by position
            x = torch.randn(16, 8, generator=g)
            loss = F.mse_loss(model(x), x.sum(1, keepdim=True))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            counter.steps += 1
            t.log(step, loss=loss)
            t.maybe_save(step, {"eval/loss": loss.item()})
            if t.should_stop(step):
                break
            time.sleep(float(cfg.task.params.get("sleep", 0.0)))


def no_training(cfg: Any) -> None:
    """Returns without ever entering `training()`."""


def zero_args() -> None:
    """Does not take the Config."""


if __name__ == "__main__":  # a script torchrun starts: `torchrun ... -m tests.user_loops CONFIG`
    import sys

    from orchestrator.config import load

    manual(load(sys.argv[1], sys.argv[2:]))
