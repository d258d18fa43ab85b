"""The demo's synthetic task with one fault injected from inside a rank, for the recovery tests
(tests/test_recovery.py, tests/submit_slurm, bench/chaos): the same numbers as the demo, so a
recovered run can be compared with an uninterrupted one bit for bit.

`fault` at rank `on_rank`'s `at_step`-th step (counted by the run's progress, so a restarted
life reaches the same step again):
- `kill`: SIGKILL itself (the OOM killer, a segfault);
- `stop`: SIGSTOP itself (a hung rank: its peers wait in a collective);
- `raise`: raise ValueError (a bug in the task: it repeats at the same step).
With `once` (a file path) the fault fires only if that file does not exist yet, and creates it
first: a transient fault. The file counts the faults that landed (one line each)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator import dist, ending
from orchestrator.tasks.base import Batch
from orchestrator.tasks.synthetic import SyntheticClassification


class Faulty(SyntheticClassification):
    def __init__(
        self,
        fault: str = "kill",
        on_rank: int = 1,
        at_step: int = 10,
        once: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fault, self.on_rank, self.at_step, self.once = fault, on_rank, at_step, once

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if ending.current_step() == self.at_step and dist.rank() == self.on_rank and self._fire():
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                raise ValueError(f"injected bug at step {self.at_step}")
        return super().loss(model, batch)

    def _fire(self) -> bool:
        if self.once:
            marker = Path(self.once)
            if marker.exists():
                return False
            marker.write_text(f"{self.fault} rank {self.on_rank} step {self.at_step}\n")
        return True


class Paced(SyntheticClassification):
    """The demo's task with every batch's loss taking at least `step_s` more: the same numbers,
    slower steps. Ranks agree on a stop about every 0.1 s of steps (orchestrator/cadence.py);
    on the demo's ~3 ms steps that can be 30 steps apart, past the end of a 24-step run, so a
    stop asked mid-run there can end as a finished run. Paced, it lands within a step or two."""

    def __init__(self, step_s: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_s = step_s

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        time.sleep(self.step_s)
        return super().loss(model, batch)
