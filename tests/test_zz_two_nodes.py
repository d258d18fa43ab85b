"""slurm/train.sbatch across two nodes: the dev cluster's virtual nodes n1 and n2.

This module switches the cluster to `slurm/dev-cluster start --nodes 2` and back to single-node
mode at teardown; its name sorts last so the single-node Slurm tests run before it. The nodes
are this machine with their own hostnames (UTS namespaces) and /etc/hosts, so MASTER_ADDR=n1
resolves on both; they share the filesystem, so the pytest tmp dir serves as shared storage.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import test_sbatch_path
from tests.fixtures.slurm import DEV_CLUSTER, SlurmCluster, _unavailable
from tests.test_sbatch_path import check_resumed_and_identical, preempt_once, reference_run

pytestmark = pytest.mark.slurm

submit = test_sbatch_path.submit  # the same fixture, registered here too
SWITCH_TIMEOUT_S = 120  # drains jobs (up to 30 s), restarts the daemons (~1 s)


def _dev_cluster_start(*args: str) -> str | None:
    """`slurm/dev-cluster start ARGS`; why it failed, or None."""
    try:
        proc = subprocess.run(
            [str(DEV_CLUSTER), "start", *args],
            capture_output=True, text=True, timeout=SWITCH_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"slurm/dev-cluster start {' '.join(args)}: {e}"
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:]
        return f"slurm/dev-cluster start {' '.join(args)} exited {proc.returncode}: " + " | ".join(
            tail
        )
    return None


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster: SlurmCluster) -> Iterator[None]:
    # Depends on slurm_cluster so that the session fixture (which starts single-node mode) is
    # set up first and not in the middle of this module.
    try:
        reason = _dev_cluster_start("--nodes", "2")
        if reason is not None:
            _unavailable(reason)
        yield
    finally:
        reason = _dev_cluster_start()  # single-node again, whatever happened
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
    submit,
    host_logging_python: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    job = submit(
        run_dir,
        "--nodes=2",
        "--ntasks-per-node=1",
        env={"STOCKPOT_PYTHON": str(host_logging_python)},
    )
    timings = preempt_once(job)
    log = job.log()
    for restart in (0, 1):
        hosts = dict(re.findall(rf"^host-check: rank (\d) on (\S+) restart {restart}$", log, re.M))
        assert hosts == {"0": "n1", "1": "n2"}, f"restart {restart}: {hosts}\n{job.tail()}"
    assert job.info().get("NodeList") == "n[1-2]"
    check_resumed_and_identical(job, run_dir, reference, int(timings["stopped_at_step"]))
