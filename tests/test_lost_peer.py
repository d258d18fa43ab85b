"""A rank that dies mid-run: its peer says so in one line, with no traceback, and leaves with
exit code 1, whether `stockpot run` started the ranks or submitit's job did (both run
`orchestrator.worker.run_rank`). Real processes, real gloo, a real SIGKILL."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch import jobs
from orchestrator import dist
from orchestrator.storage import Store
from orchestrator.tasks.base import Batch
from orchestrator.tasks.synthetic import SyntheticClassification
from tests.runs import REPO, STOCKPOT

LOST = "rank 0: a collective failed: rank 1 died, left or hung past trainer.collective_timeout_s"
ARGS = [
    "configs/demo.yaml", f"task._target_={__name__}.DiesOnRank", "task.n_train=1024",
    "task.n_eval=128", "launcher.max_restarts=0",
]  # fmt: skip


class DiesOnRank(SyntheticClassification):
    """The synthetic task, except that rank `dies_on_rank` SIGKILLs itself at its
    `dies_at_step`-th loss: a peer that dies without a word, mid-step."""

    def __init__(self, dies_on_rank: int = 1, dies_at_step: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dies_on_rank, self.dies_at_step, self.losses = dies_on_rank, dies_at_step, 0

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        self.losses += 1
        if self.losses == self.dies_at_step and dist.rank() == self.dies_on_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().loss(model, batch)


def stockpot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STOCKPOT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, check=False)  # fmt: skip


def assert_one_line(text: str) -> None:
    assert [line for line in text.splitlines() if "a collective failed" in line], text[-3000:]
    (line,) = [line for line in text.splitlines() if "a collective failed" in line]
    assert LOST in line and "Traceback" not in text, text[-3000:]


def test_under_stockpot_run(tmp_path: Path) -> None:
    out = stockpot("run", *ARGS, f"run.dir={tmp_path / 'run'}")
    assert out.returncode == 128 + signal.SIGKILL, out.stderr[-3000:]  # the first to fail
    assert_one_line(out.stdout + out.stderr)


def test_under_the_submitit_job(tmp_path: Path) -> None:
    """submitit's LocalExecutor runs `launch.job.TrainingJob` as it runs under Slurm; rank 0's
    result is the line, which the login side's `job.result()` raises."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    out = stockpot("submit", *ARGS, "launcher.tasks_per_node=2", f"run.dir={run}",
                   f"launcher.log_dir={logs}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    (record,) = jobs.read_jobs(Store(str(run)))
    controller = int(record["job_id"])  # the LocalExecutor's controller: its pid is the job id
    deadline = time.monotonic() + 180
    while _alive(controller):  # it ends once both tasks have
        assert time.monotonic() < deadline, "the local job did not end in 180 s"
        time.sleep(0.2)
    job_id = record["job_id"]
    result = pickle.loads((logs / f"{job_id}_0_result.pkl").read_bytes())
    assert result[0] == "error" and result[1].startswith(LOST), result
    assert_one_line((logs / f"{job_id}_0_log.err").read_text())


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has ended: not our child, nobody may reap it soon)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
