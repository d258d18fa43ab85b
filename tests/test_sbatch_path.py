"""slurm/train.sbatch on the real dev cluster: preempted once through its trap, it requeues itself,
resumes, finishes, and ends bit-identical to a run never interrupted.

The signal is USR2 to the batch shell only (`scancel --batch`), as `--signal=B:USR2@90` delivers
it before a time limit: the script must forward it to the ranks, see them exit 75 after
committing, and requeue the job itself. Helpers here are shared with test_zz_two_nodes.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same, final_state
from tests.test_resume_exact import losses

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train.sbatch"
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
MAX_STEPS = 40
TRAIN = [
    "configs/demo.yaml", f"trainer.max_steps={MAX_STEPS}", "trainer.nproc=2",
    "task.n_train=4096", "task.n_eval=512", "trainer.log_every=1", "checkpoint.every_steps=1000",
    # ~0.1 s a step on 2 cores: a signal sent after step 3 stops the run long before step 40.
    "task.hidden=512",
]  # fmt: skip
SIGNAL_AFTER_STEP = 3
START_TIMEOUT_S = 60  # submit -> SIGNAL_AFTER_STEP (torch import dominates)
REQUEUE_TIMEOUT_S = 30  # signal -> the script's requeue
FINISH_TIMEOUT_S = 60  # requeue -> the job leaves the queue
STEP_LINE = re.compile(r"^(\S+ \S+) \[rank 0\] INFO orchestrator\.loop: step (\d+)/", re.M)


@dataclasses.dataclass
class SbatchJob:
    job_id: str
    out: Path  # the job's --output (appended to by every run of it)

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def in_queue(self) -> bool:
        return bool(_slurm("squeue", "-h", "-j", self.job_id, "-o", "%A").strip())

    def info(self) -> dict[str, str]:
        """`scontrol show job` fields; slurmctld keeps finished jobs for MinJobAge (300 s)."""
        line = _slurm("scontrol", "show", "job", "-o", self.job_id)
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


def _slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout


@pytest.fixture
def submit(tmp_path: Path) -> Iterator:
    """submit(run_dir, *sbatch_options, env=...) -> SbatchJob; cancels what is left at the end,
    so a failed test does not leave a job holding the cluster."""
    jobs: list[SbatchJob] = []

    def _submit(run_dir: Path, *options: str, env: dict[str, str] | None = None) -> SbatchJob:
        out = tmp_path / f"job-{len(jobs)}.out"
        proc = subprocess.run(
            ["sbatch", "--parsable", f"--output={out}", *options, str(SCRIPT), *TRAIN,
             f"run.dir={run_dir}"],
            cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        jobs.append(SbatchJob(proc.stdout.strip().split(";")[0], out))
        return jobs[-1]

    yield _submit
    for job in jobs:
        if job.in_queue():
            subprocess.run(["scancel", job.job_id], timeout=30, check=False)
            job.wait_gone(30)


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
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=120, check=False,
            ).returncode  # fmt: skip
        assert code == 0, log.read_text()[-3000:]
    return run_dir


def preempt_once(job: SbatchJob) -> dict[str, float]:
    """USR2 to the batch shell after SIGNAL_AFTER_STEP; wait for the stop, the requeue and the
    end. Returns timings (s): signal -> commit, requeue -> first step of the resumed run."""
    job.wait_for(rf"\[rank 0\] INFO orchestrator\.loop: step {SIGNAL_AFTER_STEP}/", START_TIMEOUT_S)
    signalled = time.time()
    subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], timeout=30, check=True)
    stop = job.wait_for(r"^(\S+ \S+) .*stop requested \(SIGUSR2\): step (\d+) committed", 30)
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


def check_resumed_and_identical(job: SbatchJob, run_dir: Path, reference: Path, stopped: int):
    """Committed at the stop, requeued once (restart 1 in output and metrics), finished with
    exit 0, final weights and per-step losses equal to the uninterrupted reference."""
    info = job.info()
    assert (info.get("JobState"), info.get("ExitCode"), info.get("Restarts")) == (
        "COMPLETED",
        "0:0",
        "1",
    ), f"{info}\n{job.tail()}"
    log = job.log()
    assert re.search(r"^train\.sbatch: .* restart 0 ", log, re.M), log
    assert re.search(r"^train\.sbatch: .* restart 1 ", log, re.M), log
    assert f"resumed from step {stopped} (resume #1)" in log
    committed = {c.step: c for c in catalog.scan(Store(str(run_dir))).committed}
    assert stopped in committed and stopped < MAX_STEPS, sorted(committed)
    assert committed[MAX_STEPS].manifest.world_size == 2
    restarts = {r["step"]: r["restart"] for r in read_metrics(Store(str(run_dir))) if "loss" in r}
    assert {restarts[s] for s in range(1, stopped + 1)} == {0}
    assert {restarts[s] for s in range(stopped + 1, MAX_STEPS + 1)} == {1}
    assert_same(final_state(reference), final_state(run_dir))
    assert losses(run_dir) == losses(reference)


def test_trap_forwards_usr2_requeues_once_and_resumes_bit_identical(
    submit, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    # Both ranks from srun on the one node; the python is the default, the submit dir's .venv.
    job = submit(run_dir, "--ntasks-per-node=2")
    timings = preempt_once(job)
    check_resumed_and_identical(job, run_dir, reference, int(timings["stopped_at_step"]))


def test_requeue_bound_ends_with_exit_75(submit, tmp_path: Path) -> None:
    """STOCKPOT_MAX_REQUEUES=0: stopped and committed, but not requeued; the job fails with 75."""
    run_dir = tmp_path / "run"
    job = submit(run_dir, "--ntasks-per-node=2", env={"STOCKPOT_MAX_REQUEUES": "0"})
    job.wait_for(rf"\[rank 0\] INFO orchestrator\.loop: step {SIGNAL_AFTER_STEP}/", START_TIMEOUT_S)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], timeout=30, check=True)
    job.wait_gone(REQUEUE_TIMEOUT_S)
    info = job.info()
    assert (info.get("JobState"), info.get("ExitCode"), info.get("Restarts")) == (
        "FAILED",
        "75:0",
        "0",
    ), f"{info}\n{job.tail()}"
    assert "not requeueing: already requeued 0 times" in job.log()
    assert catalog.scan(Store(str(run_dir))).latest().step < MAX_STEPS


def test_scancel_is_not_undone_by_a_requeue(submit, tmp_path: Path) -> None:
    """A plain scancel also makes the ranks save and exit 75, but the job must stay cancelled:
    `scontrol requeue` would revive a cancelled, still-completing job."""
    run_dir = tmp_path / "run"
    job = submit(run_dir, "--ntasks-per-node=2")
    job.wait_for(rf"\[rank 0\] INFO orchestrator\.loop: step {SIGNAL_AFTER_STEP}/", START_TIMEOUT_S)
    subprocess.run(["scancel", job.job_id], timeout=30, check=True)
    job.wait_gone(REQUEUE_TIMEOUT_S)
    info = job.info()
    assert (info.get("JobState"), info.get("Restarts")) == ("CANCELLED", "0"), job.tail()
    log = job.log()
    assert "not requeueing: job is" in log and "requeued job" not in log, log
    assert re.search(r"stop requested \(SIG(TERM|USR2)\): step \d+ committed", log), log
    assert catalog.scan(Store(str(run_dir))).latest().step < MAX_STEPS


def test_usr2_during_start_up_still_requeues(
    submit, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A USR2 that reaches the ranks before their handlers exist (imports take seconds) ends
    them; nothing was trained, so the script requeues all the same and the run completes."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    job = submit(run_dir, "--ntasks-per-node=2")
    job.wait_for(r"^train\.sbatch: .* restart 0 ", START_TIMEOUT_S)
    time.sleep(0.3)  # srun has started the ranks; they are still importing torch
    subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], timeout=30, check=True)
    job.wait_for(r"^train\.sbatch: .*; requeued job", REQUEUE_TIMEOUT_S)
    job.wait_gone(FINISH_TIMEOUT_S)
    info = job.info()
    assert (info.get("JobState"), info.get("ExitCode"), info.get("Restarts")) == (
        "COMPLETED",
        "0:0",
        "1",
    ), f"{info}\n{job.tail()}"
    assert_same(final_state(reference), final_state(run_dir))
