"""DistEnv.from_environ: what each launcher's variables mean (tables of real captures),
the one-line errors for bad values, which launcher wins when several set variables, and
in_managed_job."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.env import DistEnv, in_managed_job
from tests.launcher_envs import BATCH_SCRIPT, SRUN_TASK1, SUBMITIT_LOCAL, TORCHRUN, TWO_NODES

# Derived master ports, worked out by hand from the documented rule
# 20000 + (job * 7 + restarts * 13) mod 30000, not with the code under test:
PORT_JOB_8 = 20056  # 8 * 7 = 56
PORT_JOB_8_REQUEUED = 20069  # 56 + 1 * 13 = 69
PORT_JOB_9 = 20063  # 63
PORT_JOB_41 = 20287  # 287
PORT_JOB_4242 = 49694  # 29694


FIELDS = ("source", "rank", "local_rank", "world_size", "local_world_size", "node_rank",
          "num_nodes", "master_addr", "master_port", "job_id", "restart_count")  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, ("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0, None, 0), id="empty"),
        pytest.param(
            {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "2"},
            ("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0, "5", 2),
            id="salloc-shell",
        ),
        pytest.param(
            TORCHRUN, ("torchrun", 3, 1, 4, 2, 1, 2, "node-a", 29500, None, 0), id="torchrun"
        ),
        pytest.param(
            {"RANK": "0", "WORLD_SIZE": "1"},
            ("torchrun", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0, None, 0),
            id="torchrun-world-1-needs-no-master",
        ),
        pytest.param(
            {"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            ("torchrun", 2, 2, 3, 3, 0, 1, "h", 1, None, 0),
            id="torchrun-without-local-vars-is-one-node",
        ),
        pytest.param(
            SRUN_TASK1 | TORCHRUN,
            ("torchrun", 3, 1, 4, 2, 1, 2, "node-a", 29500, "8", 0),
            id="torchrun-inside-srun-wins",
        ),
        pytest.param(
            SRUN_TASK1,
            ("slurm", 1, 1, 2, 2, 0, 1, "vm", PORT_JOB_8, "8", 0),
            id="srun-capture",
        ),
        pytest.param(
            SRUN_TASK1 | {"SLURM_RESTART_COUNT": "1"},
            ("slurm", 1, 1, 2, 2, 0, 1, "vm", PORT_JOB_8_REQUEUED, "8", 1),
            id="srun-requeued",
        ),
        pytest.param(
            SRUN_TASK1 | {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"},
            ("slurm", 1, 1, 2, 2, 0, 1, "10.0.0.1", 1234, "8", 0),
            id="srun-master-override",
        ),
        pytest.param(
            TWO_NODES,
            ("slurm", 3, 1, 4, 2, 1, 2, "n1", PORT_JOB_41, "41", 0),
            id="two-nodes",
        ),
        pytest.param(
            TWO_NODES
            | {"SLURM_NTASKS": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
            | {"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_TASKS_PER_NODE": "2,1"},
            ("slurm", 2, 0, 3, 1, 1, 2, "n1", PORT_JOB_41, "41", 0),
            id="uneven-nodes-use-this-nodes-count",
        ),
        pytest.param(
            # srun -n1 inside an sbatch --ntasks-per-node=2: the step layout wins over the request.
            SRUN_TASK1
            | {"SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
            | {"SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"},
            ("slurm", 0, 0, 1, 1, 0, 1, "vm", PORT_JOB_8, "8", 0),
            id="step-layout-over-request",
        ),
        pytest.param(
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "9"}
            | {"SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NUM_NODES": "2"}
            | {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_ARRAY_JOB_ID": "7"}
            | {"SLURM_ARRAY_TASK_ID": "2"},
            ("slurm", 0, 0, 2, 1, 0, 2, "gpu07", PORT_JOB_9, "7_2", 0),
            id="array-task-ntasks-per-node",
        ),
        pytest.param(
            BATCH_SCRIPT | {"SLURM_NTASKS": "1", "SLURM_TASKS_PER_NODE": "1"},
            ("slurm", 0, 0, 1, 1, 0, 1, "vm", PORT_JOB_8, "8", 0),
            id="batch-script-of-one-task",
        ),
        pytest.param(
            SUBMITIT_LOCAL,
            ("submitit-local", 1, 1, 2, 2, 0, 1, "127.0.0.1", PORT_JOB_4242, None, 0),
            id="submitit-local-executor",
        ),
        pytest.param(
            # submitit's LocalExecutor inside an sbatch script: its variables win over Slurm's.
            BATCH_SCRIPT | SUBMITIT_LOCAL,
            ("submitit-local", 1, 1, 2, 2, 0, 1, "127.0.0.1", PORT_JOB_4242, "8", 0),
            id="submitit-local-inside-batch-script",
        ),
        pytest.param(
            SUBMITIT_LOCAL | TORCHRUN,
            ("torchrun", 3, 1, 4, 2, 1, 2, "node-a", 29500, None, 0),
            id="torchrun-vars-win-over-submitit-local",
        ),
        pytest.param(
            {"RANK": "", "WORLD_SIZE": " ", "SLURM_RESTART_COUNT": ""},
            ("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 0, None, 0),
            id="blank-is-unset",
        ),
    ],
)
def test_from_environ(env: dict[str, str], expected: tuple[object, ...]) -> None:
    got = DistEnv.from_environ(env)
    assert tuple(getattr(got, f) for f in FIELDS) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID='x' is not an integer"),
        (SRUN_TASK1 | {"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not in [0, SLURM_NTASKS=2)"),
        (SRUN_TASK1 | {"SLURM_NTASKS": "0"}, "SLURM_NTASKS=0 must be >= 1"),
        (SRUN_TASK1 | {"SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 is not in [0, tasks on this"),
        (TWO_NODES | {"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is not in [0, SLURM_STEP_NUM_NODES=2)"),
        (SRUN_TASK1 | {"SLURM_STEP_TASKS_PER_NODE": "2(x"}, "SLURM_STEP_TASKS_PER_NODE='2(x'"),
        (TWO_NODES | {"SLURM_STEP_TASKS_PER_NODE": "4"}, "has no entry for SLURM_NODEID=1"),
        (SRUN_TASK1 | {"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc' is not an integer"),
        (SRUN_TASK1 | {"SLURM_RESTART_COUNT": "-1"}, "SLURM_RESTART_COUNT=-1 must be >= 0"),
        (SRUN_TASK1 | {"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
        (SRUN_TASK1 | {"MASTER_PORT": "0"}, "MASTER_PORT=0: ranks cannot meet on port 0"),
        (SRUN_TASK1 | {"SLURM_STEP_NODELIST": "vm[1-"}, "SLURM_STEP_NODELIST='vm[1-'"),
        (BATCH_SCRIPT, "SLURM_NTASKS=2 but SLURM_STEP_ID is unset"),
        (
            {k: v for k, v in SRUN_TASK1.items() if "NODELIST" not in k},
            "MASTER_ADDR is not set and neither is SLURM_JOB_NODELIST",
        ),
        (
            {k: v for k, v in SRUN_TASK1.items() if k != "SLURM_JOB_ID"},
            "MASTER_PORT is not set and SLURM_JOB_ID is missing",
        ),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not in [0, WORLD_SIZE=2)"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 must be >= 0"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set (needed with RANK=1"),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"},
            "MASTER_PORT is not set (needed when WORLD_SIZE > 1)",
        ),
        (TORCHRUN | {"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not in [0, LOCAL_WORLD_SIZE=2)"),
        (TORCHRUN | {"LOCAL_WORLD_SIZE": "5"}, "LOCAL_WORLD_SIZE=5 exceeds WORLD_SIZE=4"),
    ],
)
def test_from_environ_rejects(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        DistEnv.from_environ(env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_properties_and_direct_validation() -> None:
    leader = DistEnv(0, 0, 2, 2, "h", 1, "torchrun")
    assert leader.is_leader and leader.is_distributed
    assert not DistEnv.from_environ({}).is_distributed
    assert not DistEnv(1, 1, 2, 2, "h", 1, "slurm").is_leader
    with pytest.raises(ValueError, match=r"rank=2 is not in \[0, world_size=2\)"):
        DistEnv(2, 0, 2, 2, "h", 1, "slurm")
    with pytest.raises(ValueError, match="master_port=-1"):
        DistEnv(0, 0, 1, 1, "h", -1, "single")


@pytest.mark.parametrize(
    ("env", "managed"),
    [
        ({}, False),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9"}, False),  # batch script
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, True),  # srun task
        ({"SLURM_PROCID": "0", "SLURM_STEPID": "0"}, True),
        ({"RANK": "0", "WORLD_SIZE": "2"}, True),
        ({"RANK": "0"}, False),
        ({"RANK": "", "WORLD_SIZE": ""}, False),
        ({"SLURM_STEP_ID": "0"}, False),
        (SUBMITIT_LOCAL, True),
        ({"SUBMITIT_EXECUTOR": "slurm"}, False),
    ],
)
def test_in_managed_job(env: dict[str, str], managed: bool) -> None:
    assert in_managed_job(env) is managed


TORCHRUN_VARS = ("RANK", "WORLD_SIZE")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS")


@given(present=st.sets(st.sampled_from(TORCHRUN_VARS + SLURM_VARS)), rank=st.integers(0, 3))
def test_precedence(present: set[str], rank: int) -> None:
    env = {"MASTER_ADDR": "m", "MASTER_PORT": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "3"}
    env |= {"SLURM_JOB_NODELIST": "vm", "SLURM_LOCALID": str(rank)}
    env |= {name: str(rank) for name in ("RANK", "SLURM_PROCID") if name in present}
    env |= {name: "4" for name in ("WORLD_SIZE", "SLURM_NTASKS") if name in present}
    got = DistEnv.from_environ(env)
    if set(TORCHRUN_VARS) <= present:
        assert got.source == "torchrun"
    elif set(SLURM_VARS) <= present:
        assert got.source == "slurm"
    else:
        assert got.source == "single"
    assert (got.rank, got.world_size) == ((rank, 4) if got.source != "single" else (0, 1))
