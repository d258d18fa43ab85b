"""Two-node jobs on the dev cluster's virtual nodes: slurm/train.sbatch across n1 and n2, and a
`stockpot submit` job that loses a node mid-run and goes on on the spare node n3.

This module switches the cluster to `slurm/dev-cluster start --nodes 3` and back to single-node
mode at teardown; its tests are marked `two_nodes`, which tests/conftest.py runs after every
other test, so the single-node Slurm tests never meet the two-node cluster. The nodes
are this machine with their own hostnames (UTS namespaces) and /etc/hosts, so MASTER_ADDR=n1
resolves on both; they share the filesystem, so the pytest tmp dir serves as shared storage.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.s3server import S3Server
from launch.jobs import job_state
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same, final_state
from tests.fixtures.slurm import SlurmCluster, start_cluster, unavailable
from tests.runs import REPO, STOCKPOT, frozen, losses, newest_step, wait_until
from tests.sbatch_jobs import (
    MAX_STEPS,
    START_TIMEOUT_S,
    TRAIN,
    check_resumed_and_identical,
    preempt_once,
    reference_run,
    slurm,
)

pytestmark = [pytest.mark.slurm, pytest.mark.two_nodes]

SWITCH_TIMEOUT_S = 120  # drains jobs (up to 30 s), restarts the daemons (~1 s)


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster: SlurmCluster) -> Iterator[None]:
    # Depends on slurm_cluster so that the session fixture (which starts single-node mode) is
    # set up first and not in the middle of this module.
    try:
        reason = start_cluster("--nodes", "3", timeout_s=SWITCH_TIMEOUT_S)
        if reason is not None:
            unavailable(reason)
        yield
    finally:
        reason = start_cluster(timeout_s=SWITCH_TIMEOUT_S)  # single-node again, whatever happened
        assert reason is None, reason


@pytest.fixture
def host_logging_python(tmp_path: Path) -> Path:
    """A python for STOCKPOT_PYTHON that first says which host its rank runs on, then execs
    this venv's python: the ranks' own evidence that they ran on n1 and n2."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'echo "host-check: rank $SLURM_PROCID on $(hostname) restart ${SLURM_RESTART_COUNT:-0}"\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def test_two_nodes_preempted_once_resume_on_both_and_end_bit_identical(
    two_nodes: None,
    sbatch,
    host_logging_python: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With tiered checkpoints, a local dir per node (`${oc.env:SLURMD_NODENAME}`) and run.dir
    on S3 (moto): the stop's save commits on both nodes and is made durable on S3 before the
    job exits; requeued
    onto the same nodes, each rank reads its node's files from there and the other node's from
    run.dir. Then, with n2's dir wiped, a job on the same nodes restores the final step, n2's
    rank reading all from run.dir."""
    reference = reference_run(tmp_path_factory)
    run_dir, nodes = f"{s3_bucket}/run", tmp_path / "nodes"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # ranks and this process
    tiers = (f"checkpoint.local_dir={nodes}/${{oc.env:SLURMD_NODENAME}}",)
    # The reference runs 2 ranks on one 2-CPU node: 1 CPU thread each (env.cpu_threads). One
    # rank per node would take 2, and a different thread count changes float reduction order:
    # pinned, so the two layouts can be compared bit for bit.
    env = {"STOCKPOT_PYTHON": str(host_logging_python), "OMP_NUM_THREADS": "1",
           "AWS_ENDPOINT_URL": s3_server.endpoint_url}  # fmt: skip
    job = sbatch(run_dir, "--nodes=2", "--ntasks-per-node=1", env=env, overrides=tiers)
    timings = preempt_once(job, run_dir)
    log = job.log()
    for restart in (0, 1):
        hosts = dict(re.findall(rf"^host-check: rank (\d) on (\S+) restart {restart}$", log, re.M))
        assert hosts == {"0": "n1", "1": "n2"}, f"restart {restart}: {hosts}\n{job.tail()}"
    assert job.info().get("NodeList") == "n[1-2]"
    stopped = int(timings["stopped_at_step"])
    check_resumed_and_identical(job, run_dir, reference, stopped)
    assert f"restored step {stopped} from the durable+local tier" in log, log[-3000:]
    for node, rank in (("n1", 0), ("n2", 1)):
        held = {p.name for p in (nodes / node / "checkpoints" / f"step-{MAX_STEPS:09d}").iterdir()}
        assert f"__{rank}_0.distcp" in held and f"__{1 - rank}_0.distcp" not in held, held
    shutil.rmtree(nodes / "n2")
    again = sbatch(run_dir, "--nodes=2", "--ntasks-per-node=1", env=env, overrides=tiers)
    again.wait_gone(START_TIMEOUT_S)
    text = again.log()
    assert f"restore of step {MAX_STEPS}: 0 rank(s) read only their node's copy, 2 read" in text, (
        text[-3000:]
    )
    assert_same(final_state(reference), final_state(run_dir))


def test_a_node_failure_requeues_onto_healthy_nodes_and_ends_bit_identical(
    two_nodes: None, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A 2-node job (n1, n2) loses n2 after a commit: its slurmd dies, the node is marked down
    and its rank killed, while the ranks are frozen so the fault lands mid-run. Slurm ends the
    allocation and requeues the job; it runs on n1 and the spare n3 and resumes."""
    reference = reference_run(tmp_path_factory)
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    out = subprocess.run(
        [STOCKPOT, "submit", *TRAIN, "launcher.kind=slurm", "launcher.partition=debug",
         "launcher.nodes=2", "launcher.tasks_per_node=1", "checkpoint.every_steps=5",
         "run.name=nodefail", f"run.dir={run_dir}", f"launcher.log_dir={logs}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    job_id = str(json.loads((run_dir / "jobs.json").read_text())[0]["job_id"])
    try:
        wait_until(lambda: newest_step(run_dir) >= 10, "step 10 committed", timeout=START_TIMEOUT_S)
        with frozen(_ranks_of(job_id)):
            committed = newest_step(run_dir)
            assert _node_of(job_id) == "n[1-2]"
            _fail_node(job_id, "n2")
        wait_until(
            lambda: job_state({"job_id": job_id}) in ("COMPLETED", "FAILED"), "the job's end", 300
        )
    finally:
        reason = start_cluster("--nodes", "3", timeout_s=SWITCH_TIMEOUT_S)  # n2 back
        assert reason is None, reason
    batch_log = (logs / f"{job_id}_0_log.out").read_text()
    assert job_state({"job_id": job_id}) == "COMPLETED", batch_log[-3000:]
    assert f"life {job_id}-1-0: starting 2 rank(s) on n[1,3]" in batch_log, batch_log[-3000:]
    resumed = [r for r in read_metrics(Store(str(run_dir))) if r.get("event") == "resumed"]
    assert [(r["step"], r["restart"]) for r in resumed] == [(committed, 1)], resumed
    assert_same(final_state(run_dir, MAX_STEPS), final_state(reference, MAX_STEPS))
    assert losses(run_dir) == losses(reference)


def _node_of(job_id: str) -> str:
    return slurm("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%N").strip()


def _environs(job_id: str) -> Iterator[tuple[int, list[bytes], bytes]]:
    """(pid, environment, cmdline) of every process of the job (one PID space for all nodes)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env:
            yield int(proc.name), env, cmdline


def _ranks_of(job_id: str) -> list[int]:
    ranks = [pid for pid, _, cmd in _environs(job_id) if b"submitit.core._submit" in cmd]
    assert ranks, f"no rank processes for job {job_id}"
    return ranks


def _fail_node(job_id: str, node: str) -> None:
    """What a dead node looks like: every process on it (its slurmd, the slurmd's forked
    children, slurmstepd, the job's rank) killed at once, then marked down. Killing only the
    slurmd of the PID file once left a forked child that answered slurmctld 0.4 s after the
    node was marked down, and ReturnToService=2 put the node back in service."""
    pid_file = Path(os.environ.get("STOCKPOT_SLURM_DIR", "/var/tmp/stockpot-slurm"))
    slurmd = int((pid_file / "run" / f"slurmd-{node}.pid").read_text())
    uts = os.readlink(f"/proc/{slurmd}/ns/uts")  # each node is a UTS namespace of its own
    assert uts != os.readlink("/proc/self/ns/uts"), f"{node} is not a node of its own here"
    on_node: dict[int, bool] = {}  # pid -> a process of the job; all found before any dies
    for proc in Path("/proc").glob("[0-9]*"):  # (a task may die with its slurmstepd)
        try:
            if os.readlink(proc / "ns/uts") == uts:
                env = (proc / "environ").read_bytes()
                on_node[int(proc.name)] = f"SLURM_JOB_ID={job_id}".encode() in env
        except OSError:
            continue
    assert any(on_node.values()), f"no process of job {job_id} on {node}"
    for pid in on_node:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    slurm("scontrol", "update", f"nodename={node}", "state=down", "reason=node-failure-test")
