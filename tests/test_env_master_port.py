"""The derived master port (20000 + (job * 7 + restarts * 13) mod 30000): in its span, the
same on every task, different after a requeue and for the neighbouring job."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.env import DistEnv, derived_master_port
from tests.launcher_envs import SRUN_TASK1

ints = st.integers(min_value=0, max_value=10**9)


@given(job=ints, restarts=st.integers(min_value=0, max_value=1000))
def test_derived_port_in_range_and_moves_on_requeue(job: int, restarts: int) -> None:
    env = SRUN_TASK1 | {"SLURM_JOB_ID": str(job), "SLURM_RESTART_COUNT": str(restarts)}
    port = DistEnv.from_environ(env).master_port
    assert 20000 <= port < 50000  # the documented span
    # Every task derives the same port; the requeued run a different one.
    assert (
        DistEnv.from_environ(env | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).master_port == port
    )
    requeued = env | {"SLURM_RESTART_COUNT": str(restarts + 1)}
    assert DistEnv.from_environ(requeued).master_port != port


@pytest.mark.parametrize(
    ("job", "restarts", "port"),
    [(0, 0, 20000), (8, 0, 20056), (8, 1, 20069), (4285, 0, 49995), (4286, 0, 20002)],
)
def test_derived_master_port_by_hand(job: int, restarts: int, port: int) -> None:
    # 4285 * 7 = 29995 is the top of the span; 4286 * 7 = 30002 wraps around to 2.
    assert derived_master_port(job, restarts) == port


@given(job=ints, restarts=st.integers(min_value=0, max_value=1000))
def test_neighbouring_jobs_get_different_ports(job: int, restarts: int) -> None:
    assert derived_master_port(job, restarts) != derived_master_port(job + 1, restarts)
