"""slurm/train.sbatch across two nodes: the dev cluster's virtual nodes n1 and n2.

This module switches the cluster to `slurm/dev-cluster start --nodes 2` and back to single-node
mode at teardown; its tests are marked `two_nodes`, which tests/conftest.py runs after every
other test, so the single-node Slurm tests never meet the two-node cluster. The nodes
are this machine with their own hostnames (UTS namespaces) and /etc/hosts, so MASTER_ADDR=n1
resolves on both; they share the filesystem, so the pytest tmp dir serves as shared storage.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.slurm import SlurmCluster, start_cluster, unavailable
from tests.sbatch_jobs import check_resumed_and_identical, preempt_once, reference_run

pytestmark = [pytest.mark.slurm, pytest.mark.two_nodes]

SWITCH_TIMEOUT_S = 120  # drains jobs (up to 30 s), restarts the daemons (~1 s)


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster: SlurmCluster) -> Iterator[None]:
    # Depends on slurm_cluster so that the session fixture (which starts single-node mode) is
    # set up first and not in the middle of this module.
    try:
        reason = start_cluster("--nodes", "2", timeout_s=SWITCH_TIMEOUT_S)
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
) -> None:
    reference = reference_run(tmp_path_factory)
    run_dir = tmp_path / "run"
    # The reference runs 2 ranks on one 2-CPU node: 1 CPU thread each (env.cpu_threads). One
    # rank per node would take 2, and a different thread count changes float reduction order:
    # pinned, so the two layouts can be compared bit for bit.
    job = sbatch(
        run_dir,
        "--nodes=2",
        "--ntasks-per-node=1",
        env={"STOCKPOT_PYTHON": str(host_logging_python), "OMP_NUM_THREADS": "1"},
    )
    timings = preempt_once(job, run_dir)
    log = job.log()
    for restart in (0, 1):
        hosts = dict(re.findall(rf"^host-check: rank (\d) on (\S+) restart {restart}$", log, re.M))
        assert hosts == {"0": "n1", "1": "n2"}, f"restart {restart}: {hosts}\n{job.tail()}"
    assert job.info().get("NodeList") == "n[1-2]"
    check_resumed_and_identical(job, run_dir, reference, int(timings["stopped_at_step"]))
