"""slurm/train.sbatch on the real dev cluster: preempted once through its trap, it requeues itself,
resumes, finishes, and ends bit-identical to a run never interrupted.

The signal is USR2 to the batch shell only (`scancel --batch`), as `--signal=B:USR2@90` delivers
it before a time limit: the script must forward it to the ranks, see them exit 75 after
committing, and requeue the job itself. Shared helpers: tests/sbatch_jobs.py, and the `sbatch`
fixture in tests/fixtures/sbatch.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same, final_state
from tests.runs import catches, rank_pids, wait_until
from tests.sbatch_jobs import (
    FINISH_TIMEOUT_S,
    MAX_STEPS,
    REQUEUE_TIMEOUT_S,
    SIGNAL_AFTER_STEP,
    START_TIMEOUT_S,
    assert_completed_after_one_requeue,
    check_resumed_and_identical,
    preempt_once,
    reference_run,
)

pytestmark = pytest.mark.slurm


def test_trap_forwards_usr2_requeues_once_and_resumes_bit_identical(
    sbatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    # Both ranks from srun on the one node; the python is the default, the submit dir's .venv.
    job = sbatch(run_dir, "--ntasks-per-node=2")
    timings = preempt_once(job, run_dir)
    check_resumed_and_identical(job, run_dir, reference, int(timings["stopped_at_step"]))


def test_requeue_bound_ends_with_exit_75(sbatch, tmp_path: Path) -> None:
    """STOCKPOT_MAX_REQUEUES=0: stopped and committed, but not requeued; the job fails with 75."""
    run_dir = tmp_path / "run"
    job = sbatch(run_dir, "--ntasks-per-node=2", env={"STOCKPOT_MAX_REQUEUES": "0"})
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


def test_scancel_is_not_undone_by_a_requeue(sbatch, tmp_path: Path) -> None:
    """A plain scancel also makes the ranks save and exit 75, but the job must stay cancelled:
    `scontrol requeue` would revive a cancelled, still-completing job."""
    run_dir = tmp_path / "run"
    job = sbatch(run_dir, "--ntasks-per-node=2")
    job.wait_for(rf"\[rank 0\] INFO orchestrator\.loop: step {SIGNAL_AFTER_STEP}/", START_TIMEOUT_S)
    subprocess.run(["scancel", job.job_id], timeout=30, check=True)
    job.wait_gone(REQUEUE_TIMEOUT_S)
    info = job.info()
    assert (info.get("JobState"), info.get("Restarts")) == ("CANCELLED", "0"), job.tail()
    log = job.log()
    assert "not requeueing: job is" in log and "requeued job" not in log, log
    assert re.search(r"stop requested \(SIG(TERM|USR2)\): step \d+ committed", log), log
    assert catalog.scan(Store(str(run_dir))).latest().step < MAX_STEPS


def test_usr2_caught_during_start_up_stops_after_step_one_and_requeues(
    sbatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A USR2 that reaches the ranks after their first act (catch_early) but long before
    training (torch imports take seconds) is kept: they train step 1, commit it, exit 75, and
    the script requeues; the run resumes from step 1 and completes bit-identical."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    job = sbatch(run_dir, "--ntasks-per-node=2")
    wait_until(
        lambda: (
            len(pids := rank_pids(run_dir)) == 2
            and all(catches(pid, signal.SIGUSR2) for pid in pids)
        ),
        "both ranks to catch SIGUSR2",
        START_TIMEOUT_S,
    )
    subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], timeout=30, check=True)
    job.wait_for(r"^train\.sbatch: .*stopped after committing; requeued job", REQUEUE_TIMEOUT_S)
    job.wait_gone(FINISH_TIMEOUT_S)
    first_run = job.log().split("; requeued job")[0]
    assert first_run.count("SIGUSR2 arrived during start-up, before training began") == 2, (
        job.tail()
    )
    assert "stop requested (SIGUSR2): step 1 committed" in first_run, job.tail()
    check_resumed_and_identical(job, run_dir, reference, 1)


def test_usr2_before_the_ranks_catch_it_still_requeues(
    sbatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A USR2 that reaches the tasks before any handler exists ends them (its default action);
    nothing was trained, so the script requeues all the same and the run completes from
    scratch. The tasks are held in a wrapper shell on the first run, so the signal lands
    there every time, not by the luck of a sleep."""
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        '    echo "wrapper: task $SLURM_PROCID holding"; sleep 60\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    job = sbatch(run_dir, "--ntasks-per-node=2", env={"STOCKPOT_PYTHON": str(wrapper)})
    job.wait_for(r"^wrapper: task 0 holding", START_TIMEOUT_S)
    job.wait_for(r"^wrapper: task 1 holding", START_TIMEOUT_S)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job.job_id], timeout=30, check=True)
    job.wait_for(
        r"^train\.sbatch: .*stopped by SIGUSR2 during start-up, before training; requeued job",
        REQUEUE_TIMEOUT_S,
    )
    job.wait_gone(FINISH_TIMEOUT_S)
    assert_completed_after_one_requeue(job)
    log = job.log()
    assert "stop requested" not in log and "resumed from step" not in log, job.tail()
    records = read_metrics(Store(str(run_dir)))
    assert {r["restart"] for r in records if "loss" in r} == {1}, "every step trained after it"
    assert_same(final_state(reference), final_state(run_dir))
