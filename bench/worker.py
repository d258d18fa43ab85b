"""One rank of the checkpoint benchmarks: `python -m bench.worker PHASE[,PHASE] JSON_ARGS`.

Every rank builds the same CharLM (DDP over gloo) with its AdamW state, then runs one phase
(save.py, load.py, s3.py hold them); rank 0 prints one JSON line per measurement. Timings are
taken between barriers, so a figure is what the slowest rank took.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator import dist, parallel
from orchestrator.tasks.charlm import CharLM
from orchestrator.worker import exit_now

PHASES = {
    "save": "bench.phases:sync_phase",
    "async": "bench.phases:async_phase",
    "load": "bench.phases:restore_phase",
    "s3save": "bench.phases:s3_save_phase",
    "s3requests": "bench.phases:requests_phase",
    "tiers": "bench.phases:tiers_phase",
}


@dataclass
class Trainee:
    """The model being trained and what a step needs."""

    model: torch.nn.Module
    optim: torch.optim.Optimizer
    task: CharLM
    batch: Any

    def step(self) -> None:
        self.task.loss(self.model, self.batch).backward()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)

    def state(self) -> dict[str, Any]:
        """The plain (unwrapped) model and optimizer state, as a hand-written save takes it."""
        inner = getattr(self.model, "module", self.model)
        return {"model": inner.state_dict(), "optim": self.optim.state_dict()}


def build(d_model: int, n_layers: int, batch: int = 2, seq_len: int = 32) -> Trainee:
    task = CharLM(seq_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=8)
    torch.manual_seed(0)
    model = parallel.wrap(task.build_model(), "ddp", device="cpu")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = task.train_set()
    trainee = Trainee(model, optim, task, data.batch(torch.arange(batch)))
    trainee.step()  # AdamW's state exists only after its first step
    return trainee


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn` took on the slowest rank (barriers on both sides)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def emit(**fields: Any) -> None:
    if dist.rank() == 0:
        print(json.dumps(fields), flush=True)


def main(phases: str, args: dict[str, Any]) -> None:
    """`phases`: one phase, or several (comma-separated) run in order by the same ranks, so
    the bench starts the processes once for them."""
    runs = []
    for phase in phases.split(","):
        module, _, func = PHASES[phase].partition(":")
        runs.append(getattr(importlib.import_module(module), func))  # they import this module
    world = int(os.environ["WORLD_SIZE"])
    dist.init("gloo", int(os.environ["RANK"]), world, "127.0.0.1", int(os.environ["MASTER_PORT"]))
    trainee = build(args["d_model"], args["n_layers"])
    for run_phase in runs:
        run_phase(trainee, args)
    dist.barrier()
    exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
