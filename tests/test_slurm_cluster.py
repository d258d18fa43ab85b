"""First real Slurm tests: submitit submits to the dev cluster from slurm/dev-cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import submitit

from tests.fixtures.slurm import DEV_CLUSTER, REPO_ROOT, SlurmCluster

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 60
# A job gone from squeue may still be flushing its result pickle.
RESULT_GRACE_S = 5


def add(a: int, b: int) -> int:
    return a + b


def rank_report() -> dict[str, Any]:
    env = submitit.JobEnvironment()
    return {
        "rank": env.global_rank,
        "world_size": env.num_tasks,
        "procid": int(os.environ["SLURM_PROCID"]),
        "python": sys.executable,
    }


def make_executor(folder: Path, partition: str, **params: Any) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=sys.executable)
    executor.update_parameters(
        # Below 60 min submitit counts every signal as a time-out (capped), not a preemption.
        timeout_min=60,
        slurm_partition=partition,
        # The job unpickles functions by module name (tests.test_slurm_cluster): run from the
        # repo root, whatever directory pytest was started in.
        slurm_additional_parameters={"chdir": str(REPO_ROOT)},
        **params,
    )
    return executor


def in_queue(job_id: str) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%A"], capture_output=True, text=True, timeout=30
    ).stdout
    return bool(out.strip())


def wait_results(job: submitit.Job, timeout_s: float = JOB_TIMEOUT_S) -> list[Any]:
    """job.results(), bounded: without accounting submitit cannot tell a job that died without
    a result from a pending one, and its own wait() would poll forever."""
    deadline = time.monotonic() + timeout_s
    left_queue_at = None
    while not job.done():
        now = time.monotonic()
        if left_queue_at is None and not in_queue(job.job_id):
            left_queue_at = now
        if now > deadline or (left_queue_at is not None and now - left_queue_at > RESULT_GRACE_S):
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} gave no result; stderr:\n{job.stderr()}")
        time.sleep(0.2)
    return job.results()


def test_status_exits_zero_while_up() -> None:
    proc = subprocess.run([str(DEV_CLUSTER), "status"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "healthy" in proc.stdout


def test_partitions(slurm_cluster: SlurmCluster) -> None:
    assert set(slurm_cluster.partitions) == {"debug", "high"}
    assert slurm_cluster.default_partition == "debug"
    assert slurm_cluster.conf.is_file()


def test_function_result(slurm_cluster: SlurmCluster, slurm_tmp: Path) -> None:
    executor = make_executor(slurm_tmp, slurm_cluster.default_partition)
    job = executor.submit(add, 2, 3)
    assert wait_results(job) == [5]


def test_two_tasks_see_their_ranks(slurm_cluster: SlurmCluster, slurm_tmp: Path) -> None:
    executor = make_executor(
        slurm_tmp, slurm_cluster.default_partition, nodes=1, tasks_per_node=2, cpus_per_task=1
    )
    job = executor.submit(rank_report)
    reports = wait_results(job)
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {r["world_size"] for r in reports} == {2}
    assert all(r["procid"] == r["rank"] for r in reports)
    assert {r["python"] for r in reports} == {sys.executable}
