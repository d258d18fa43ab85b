"""slurm/train.sbatch jobs on the dev cluster, for the plain-sbatch tests (test_sbatch_path.py,
test_two_nodes.py): a job handle that reads its output and queue state, the uninterrupted
reference run, one preemption through the script's trap, and the checks after it.

The `sbatch` fixture that submits these jobs lives in tests/fixtures/sbatch.py.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same, final_state
from tests.runs import REPO, STOCKPOT, frozen, losses, rank_pids, reached, wait_until

SCRIPT = REPO / "slurm" / "train.sbatch"
MAX_STEPS = 40
TRAIN = [
    "configs/demo.yaml", f"trainer.max_steps={MAX_STEPS}", "trainer.nproc=2",
    "task.n_train=4096", "task.n_eval=512", "trainer.log_every=1", "checkpoint.every_steps=1000",
    # ~0.1 s a step on 2 cores: a signal sent after step 3 stops the run long before step 40.
    "task.hidden=512",
]  # fmt: skip
SIGNAL_AFTER_STEP = 3
# Bounds on waits, not speed targets: a loaded 2-core machine takes ~50 s to import torch and
# restore, and trains ~1 step/s (idle: ~10 s and ~10 steps/s).
START_TIMEOUT_S = 180  # submit -> SIGNAL_AFTER_STEP (torch import dominates)
REQUEUE_TIMEOUT_S = 90  # signal -> the script's requeue
FINISH_TIMEOUT_S = 240  # requeue -> the job leaves the queue
STEP_LINE = re.compile(r"^(\S+ \S+) \[rank 0\] INFO orchestrator\.loop: step (\d+)/", re.M)


@dataclasses.dataclass
class SbatchJob:
    job_id: str
    out: Path  # the job's --output (appended to by every run of it)

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def in_queue(self) -> bool:
        return bool(slurm("squeue", "-h", "-j", self.job_id, "-o", "%A").strip())

    def info(self) -> dict[str, str]:
        """`scontrol show job` fields; slurmctld keeps finished jobs for MinJobAge (300 s)."""
        line = slurm("scontrol", "show", "job", "-o", self.job_id)
        return dict(f.split("=", 1) for f in line.split() if "=" in f)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first match of `pattern` in the job's output, polled until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (m := re.search(pattern, self.log(), re.M)) is None:
            if time.monotonic() > deadline or not self.in_queue():
                pytest.fail(f"job {self.job_id}: no /{pattern}/ in its output:\n{self.tail()}")
            time.sleep(0.05)
        return m

    def wait_gone(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.in_queue():
            if time.monotonic() > deadline:
                pytest.fail(f"job {self.job_id} still queued after {timeout_s}s:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]


def slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout


def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted local `stockpot run` of TRAIN on 2 ranks; once per session (both Slurm
    test modules compare against it)."""
    run_dir = tmp_path_factory.getbasetemp() / "sbatch-reference"
    latest = catalog.scan(Store(str(run_dir))).latest()
    if latest is None or latest.step != MAX_STEPS:
        log = run_dir.with_suffix(".log")
        with open(log, "ab") as out:
            code = subprocess.run(
                [STOCKPOT, "run", *TRAIN, f"run.dir={run_dir}"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300, check=False,
            ).returncode  # fmt: skip
        assert code == 0, log.read_text()[-3000:]
    return run_dir


def preempt_once(job: SbatchJob, run_dir: Path) -> dict[str, float]:
    """USR2 to the batch shell after SIGNAL_AFTER_STEP; wait for the stop, the requeue and the
    end. Returns timings (s): signal -> commit, requeue -> first step of the resumed run.

    The ranks are frozen (SIGSTOP) from SIGNAL_AFTER_STEP until the script's forwarded USR2 has
    reached them, so the stop lands mid-run however fast the steps go (an idle machine trains
    ~100 steps/s: the signal once came after the last of the 40)."""
    job.wait_for(rf"\[rank 0\] INFO orchestrator\.loop: step {SIGNAL_AFTER_STEP}/", START_TIMEOUT_S)
    ranks = rank_pids(run_dir)
    assert ranks, f"job {job.job_id}: no rank processes for {run_dir}"
    with frozen(ranks):
        signalled = time.time()
        subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], timeout=30, check=True)
        wait_until(lambda: all(reached(pid, signal.SIGUSR2) for pid in ranks),
                   "the forwarded SIGUSR2 at every rank", REQUEUE_TIMEOUT_S)  # fmt: skip
    stop = job.wait_for(
        r"^(\S+ \S+) .*stop requested \(SIGUSR2\): step (\d+) committed", REQUEUE_TIMEOUT_S
    )
    requeued = job.wait_for(r"^train\.sbatch: (\S+ \S+) .*; requeued job", REQUEUE_TIMEOUT_S)
    job.wait_gone(FINISH_TIMEOUT_S)
    log = job.log()
    resumed_step = next(m for m in STEP_LINE.finditer(log) if m.start() > requeued.end())
    timings = {
        "signal_to_commit_s": _stamp(stop.group(1)) - signalled,
        "requeue_to_first_step_s": _stamp(resumed_step.group(1)) - _stamp(requeued.group(1)),
        "stopped_at_step": int(stop.group(2)),
    }
    print(f"job {job.job_id}: {timings}")
    return timings


def _stamp(text: str) -> float:
    """A local-time stamp from the script ('2026-11-22 17:42:57.460') or logging (',664')."""
    return datetime.strptime(text.replace(",", "."), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def check_resumed_and_identical(
    job: SbatchJob, run_dir: Path, reference: Path, stopped: int
) -> None:
    """Committed at the stop, requeued once (restart 1 in output and metrics), finished with
    exit 0, final weights and per-step losses equal to the uninterrupted reference."""
    assert_completed_after_one_requeue(job)
    log = job.log()
    assert re.search(r"^train\.sbatch: .* restart 0 ", log, re.M), log
    assert re.search(r"^train\.sbatch: .* restart 1 ", log, re.M), log
    assert f"resumed from step {stopped} (resume #1)" in log
    committed = {c.step: c for c in catalog.scan(Store(str(run_dir))).committed}
    assert stopped in committed and stopped < MAX_STEPS, sorted(committed)
    assert committed[MAX_STEPS].manifest.world_size == 2
    records = read_metrics(Store(str(run_dir)))
    resumed = [(r["step"], r["resumes"]) for r in records if r.get("event") == "resumed"]
    assert resumed == [(stopped, 1)], resumed
    restarts = {r["step"]: r["restart"] for r in records if "loss" in r}
    assert {restarts[s] for s in range(1, stopped + 1)} == {0}
    assert {restarts[s] for s in range(stopped + 1, MAX_STEPS + 1)} == {1}
    assert_same(final_state(reference), final_state(run_dir))
    assert losses(run_dir) == losses(reference)


def assert_completed_after_one_requeue(job: SbatchJob) -> None:
    info = job.info()
    assert (info.get("JobState"), info.get("ExitCode"), info.get("Restarts")) == (
        "COMPLETED",
        "0:0",
        "1",
    ), f"{info}\n{job.tail()}"
