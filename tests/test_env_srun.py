"""DistEnv.from_environ on what a real `srun -n2` step gives its tasks on the dev cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.env import DistEnv
from tests.fixtures.slurm import SlurmCluster

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slurm
def test_srun_tasks_read_as_ranks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # Our own SLURM_* (if pytest runs inside a job) and rank variables would leak into the step.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in RANK_VARS and (not k.startswith("SLURM_") or k == "SLURM_CONF")
    }
    script = f"env -0 > {tmp_path}/env.$SLURM_PROCID && hostname -s > {tmp_path}/host.$SLURM_PROCID"
    # --overcommit: the two-node mode gives each node one CPU, and this asks for two tasks on one.
    cmd = ["srun", "-n2", "-N1", "--overcommit", "-p", slurm_cluster.default_partition]
    proc = subprocess.run(
        [*cmd, "sh", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    dists = []
    for task in (0, 1):
        pairs = (item.split("=", 1) for item in (tmp_path / f"env.{task}").read_text().split("\0"))
        task_env = dict(p for p in pairs if len(p) == 2)
        assert "SLURM_STEP_ID" in task_env
        dist = DistEnv.from_environ(task_env)
        assert dist.master_addr == (tmp_path / f"host.{task}").read_text().strip()
        dists.append(dist)
    assert {d.rank for d in dists} == {0, 1}
    assert {d.local_rank for d in dists} == {0, 1}
    assert all(d.source == "slurm" and d.world_size == 2 for d in dists)
    assert all(d.local_world_size == 2 and d.num_nodes == 1 for d in dists)
    assert len({(d.master_addr, d.master_port, d.job_id) for d in dists}) == 1
    assert dists[0].restart_count == 0
