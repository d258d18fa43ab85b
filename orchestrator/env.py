"""Who this process is in the job (rank, world, rendezvous address), read from its environment.

Pure: every function reads only the mapping it is given, so the same code is tested with plain
dicts and runs under Slurm (`srun`, submitit), under `torchrun`, under `stockpot run`'s local
spawner, or alone. No torch import: the launcher plane uses this too.

Precedence (first that applies):
1. torchrun-style: RANK and WORLD_SIZE both set (torchrun and `stockpot run` set them; they win
   even inside a Slurm step, because whoever set them spawned this process).
2. submitit's LocalExecutor: SUBMITIT_EXECUTOR=local (its tasks get SUBMITIT_LOCAL_* only).
3. Slurm: SLURM_PROCID and SLURM_NTASKS set (a task of an `srun` step).
4. single: rank 0 of 1 on 127.0.0.1, port 0.

It also owns the exit code a rank leaves with when it stopped resumably (EXIT_STOPPED), which
the spawner, the sbatch script and the demo read back.

A variable set to an empty string counts as unset (`export RANK=` is the shell idiom for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from orchestrator.slurm_syntax import parse_nodelist, parse_tasks_per_node

Source = Literal["slurm", "torchrun", "submitit-local", "single"]
RequestedDevice = Literal["auto", "cpu", "cuda"]

LOOPBACK = "127.0.0.1"
# EX_TEMPFAIL: stopped by a signal after committing a checkpoint; run again to resume.
# (slurm/train.sbatch spells the same number in shell.)
EXIT_STOPPED = 75
# Derived Slurm master ports lie in [PORT_BASE, PORT_BASE + PORT_SPAN): above the usual
# registered services, below Linux's default ephemeral range (32768-60999 overlaps the top part;
# a collision there only costs one failed rendezvous, and MASTER_PORT overrides it).
PORT_BASE = 20000
PORT_SPAN = 30000


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; `from_environ` builds it from SLURM_* or torchrun vars."""

    # Global rank, 0 <= rank < world_size.
    rank: int
    # Rank among the processes on this node; picks the GPU (`cuda:<local_rank>`).
    local_rank: int
    world_size: int
    # Processes on this node.
    local_world_size: int
    # Rendezvous host of rank 0 and its TCP port (0: let a world of one pick any).
    master_addr: str
    master_port: int
    source: Source
    node_rank: int = 0
    num_nodes: int = 1
    # Slurm job id ("<array job>_<task>" for array tasks, as submitit names them); None outside.
    job_id: str | None = None
    # SLURM_RESTART_COUNT: 0 on the first run (Slurm leaves it unset), n after n requeues.
    restart_count: int = 0

    def __post_init__(self) -> None:
        _check_index("rank", self.rank, "world_size", self.world_size)
        _check_index("local_rank", self.local_rank, "local_world_size", self.local_world_size)
        _check_index("node_rank", self.node_rank, "num_nodes", self.num_nodes)
        if not 0 <= self.master_port <= 65535:
            raise ValueError(f"master_port={self.master_port} is not a port (0-65535)")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> DistEnv:
        """Read the environment (e.g. `os.environ`); one-line ValueError naming a bad variable."""
        if _torchrun_style(env):
            return _from_torchrun(env)
        if _submitit_local(env):
            return _from_submitit_local(env)
        if _get(env, "SLURM_PROCID") is not None and _get(env, "SLURM_NTASKS") is not None:
            return _from_slurm(env)
        job_id, restarts = _job_identity(env)
        return cls(0, 0, 1, 1, LOOPBACK, 0, "single", job_id=job_id, restart_count=restarts)


def in_managed_job(env: Mapping[str, str]) -> bool:
    """True when whoever started this process started its peer ranks too (an srun step,
    torchrun, `stockpot run`, submitit's LocalExecutor): train here rather than spawn ranks.

    The sbatch batch script is NOT a step: Slurm 22.05 gives it SLURM_PROCID=0 and the
    allocation's SLURM_NTASKS but no SLURM_STEP_ID, and it is one process; there `stockpot run`
    spawns its own ranks.
    """
    in_step = _get(env, "SLURM_PROCID") is not None and _in_slurm_step(env)
    return in_step or _torchrun_style(env) or _submitit_local(env)


def derived_master_port(job: int, restarts: int = 0) -> int:
    """A master port every task of a job computes alike from its job id, in
    [PORT_BASE, PORT_BASE + PORT_SPAN).

    It moves with each requeue (restart * 13): the requeued run may land on the same node while
    its predecessor's listening socket still sits in TIME_WAIT. Jobs are spread by id * 7, so
    neighbouring jobs on one node differ too.
    """
    return PORT_BASE + (job * 7 + restarts * 13) % PORT_SPAN


def backend_for(device: str) -> str:
    """The torch.distributed backend for a device string ("cuda", "cuda:1", "cpu")."""
    return "nccl" if device.split(":", 1)[0] == "cuda" else "gloo"


def device_for(local_rank: int, requested: RequestedDevice, cuda_available: bool) -> str:
    """`cuda:<local_rank>` when CUDA is requested (or "auto" and available), else "cpu"."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={requested!r} is not one of 'auto', 'cpu', 'cuda'")
    if requested == "cuda" and not cuda_available:
        raise ValueError("device='cuda' but CUDA is not available here; use 'cpu' or 'auto'")
    if requested == "cpu" or not cuda_available:
        return "cpu"
    return f"cuda:{local_rank}"


# ------------------------------------------------------------------------------- sources ----


def cpu_threads(env: Mapping[str, str], usable_cpus: int, local_world_size: int) -> int | None:
    """Intra-op threads for one rank, or None to leave torch's choice (OMP_NUM_THREADS is set:
    the user decided). Slurm's --cpus-per-task is each task's share; otherwise the CPUs this
    process may run on are split between the ranks on its node. Left alone, every rank starts
    a thread per CPU, and the ranks' threads then fight over the same cores, each step slower
    than with its share alone (figures: bench/README.md, "Threads per rank")."""
    if _get(env, "OMP_NUM_THREADS") is not None:
        return None
    if _get(env, "SLURM_CPUS_PER_TASK") is not None:
        return _int(env, "SLURM_CPUS_PER_TASK", minimum=1)
    return max(1, usable_cpus // max(1, local_world_size))


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    world = _int(env, "WORLD_SIZE", minimum=1)
    rank = _int(env, "RANK")
    _check_index("RANK", rank, "WORLD_SIZE", world)
    # Without the local variables assume one node (what a hand-written RANK/WORLD_SIZE means).
    local_world = _int(env, "LOCAL_WORLD_SIZE", default=world, minimum=1)
    if local_world > world:
        raise ValueError(f"LOCAL_WORLD_SIZE={local_world} exceeds WORLD_SIZE={world}")
    local_rank = _int(env, "LOCAL_RANK", default=rank % local_world)
    _check_index("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world)
    num_nodes = -(-world // local_world)
    # torchrun's GROUP_RANK is the node rank.
    node_rank = _int(env, "GROUP_RANK", default=rank // local_world)
    _check_index("GROUP_RANK", node_rank, "node count WORLD_SIZE/LOCAL_WORLD_SIZE", num_nodes)
    if world == 1:
        addr = _get(env, "MASTER_ADDR") or LOOPBACK
        port = _port(env, "MASTER_PORT", default=0, distributed=False)
    else:
        addr = _required(env, "MASTER_ADDR", f"with RANK={rank} and WORLD_SIZE={world}")
        port = _port(env, "MASTER_PORT", default=None, distributed=True)
    job_id, restarts = _job_identity(env)
    return DistEnv(
        rank, local_rank, world, local_world, addr, port, "torchrun",
        node_rank=node_rank, num_nodes=num_nodes, job_id=job_id, restart_count=restarts,
    )  # fmt: skip


def _torchrun_style(env: Mapping[str, str]) -> bool:
    return _get(env, "RANK") is not None and _get(env, "WORLD_SIZE") is not None


def _submitit_local(env: Mapping[str, str]) -> bool:
    return _get(env, "SUBMITIT_EXECUTOR") == "local"


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    return _get(env, "SLURM_STEP_ID") is not None or _get(env, "SLURM_STEPID") is not None


def _from_submitit_local(env: Mapping[str, str]) -> DistEnv:
    """A task of submitit's LocalExecutor: all on this machine; the port derived from the
    controller's pid (SUBMITIT_LOCAL_JOB_ID) as Slurm's is from the job id."""
    world = _int(env, "SUBMITIT_LOCAL_NTASKS", default=1, minimum=1)
    rank = _int(env, "SUBMITIT_LOCAL_GLOBALID", default=0)
    _check_index("SUBMITIT_LOCAL_GLOBALID", rank, "SUBMITIT_LOCAL_NTASKS", world)
    local_rank = _int(env, "SUBMITIT_LOCAL_LOCALID", default=rank)
    _check_index("SUBMITIT_LOCAL_LOCALID", local_rank, "SUBMITIT_LOCAL_NTASKS", world)
    job_id, restarts = _job_identity(env)
    port = derived_master_port(_int(env, "SUBMITIT_LOCAL_JOB_ID", default=0), restarts)
    return DistEnv(
        rank, local_rank, world, world, LOOPBACK, port, "submitit-local",
        job_id=job_id, restart_count=restarts,
    )  # fmt: skip


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    world = _int(env, "SLURM_NTASKS", minimum=1)
    rank = _int(env, "SLURM_PROCID")
    _check_index("SLURM_PROCID", rank, "SLURM_NTASKS", world)
    if world > 1 and not _in_slurm_step(env):
        # The batch script has SLURM_PROCID=0 and the allocation's SLURM_NTASKS but is one
        # process: taking it for rank 0 of many would wait for peers that never come.
        raise ValueError(
            f"SLURM_NTASKS={world} but SLURM_STEP_ID is unset: this is the batch script, not a "
            "task of an srun step; start the ranks with srun or `stockpot run`"
        )
    num_nodes_var, num_nodes = _first_int(
        env, ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), default=1
    )
    node_rank = _int(env, "SLURM_NODEID", default=0)
    _check_index("SLURM_NODEID", node_rank, num_nodes_var, num_nodes)
    local_world = _slurm_local_world_size(env, node_rank, world, num_nodes)
    local_rank = _int(env, "SLURM_LOCALID", default=0)
    _check_index("SLURM_LOCALID", local_rank, "tasks on this node", local_world)
    addr = _get(env, "MASTER_ADDR") or _slurm_first_host(env)
    derived = _slurm_port(env)
    if derived is None and world > 1 and _get(env, "MASTER_PORT") is None:
        raise ValueError("MASTER_PORT is not set and SLURM_JOB_ID is missing to derive one")
    port = _port(env, "MASTER_PORT", default=derived or 0, distributed=world > 1)
    job_id, restarts = _job_identity(env)
    return DistEnv(
        rank, local_rank, world, local_world, addr, port, "slurm",
        node_rank=node_rank, num_nodes=num_nodes, job_id=job_id, restart_count=restarts,
    )  # fmt: skip


def _slurm_local_world_size(
    env: Mapping[str, str], node_rank: int, world: int, num_nodes: int
) -> int:
    """Tasks on this node. The step's layout first: a step may use part of the allocation, and
    SLURM_NTASKS_PER_NODE is the sbatch request, which a later srun need not follow."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = _get(env, name)
        if value is not None:
            counts = parse_tasks_per_node(value, name)
            if node_rank >= len(counts):
                raise ValueError(f"{name}={value!r} has no entry for SLURM_NODEID={node_rank}")
            return counts[node_rank]
    if _get(env, "SLURM_NTASKS_PER_NODE") is not None:
        return _int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    if num_nodes == 1:
        return world
    raise ValueError("SLURM_TASKS_PER_NODE is not set, so tasks per node are unknown")


def _slurm_first_host(env: Mapping[str, str]) -> str:
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        value = _get(env, name)
        if value is not None:
            try:
                return parse_nodelist(value)[0]
            except ValueError as e:
                raise ValueError(f"{name}={value!r}: {e}") from None
    raise ValueError("MASTER_ADDR is not set and neither is SLURM_JOB_NODELIST")


def _slurm_port(env: Mapping[str, str]) -> int | None:
    """The job's derived master port; None without SLURM_JOB_ID."""
    if _get(env, "SLURM_JOB_ID") is None:
        return None
    restarts = _int(env, "SLURM_RESTART_COUNT", default=0)
    return derived_master_port(_int(env, "SLURM_JOB_ID"), restarts)


def _job_identity(env: Mapping[str, str]) -> tuple[str | None, int]:
    array_job, array_task = _get(env, "SLURM_ARRAY_JOB_ID"), _get(env, "SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else _get(env, "SLURM_JOB_ID")
    return job_id, _int(env, "SLURM_RESTART_COUNT", default=0)


# ------------------------------------------------------------------------ variable reading ----


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _required(env: Mapping[str, str], name: str, why: str) -> str:
    value = _get(env, name)
    if value is None:
        raise ValueError(f"{name} is not set (needed {why})")
    return value


def _int(env: Mapping[str, str], name: str, *, default: int | None = None, minimum: int = 0) -> int:
    raw = _get(env, name)
    if raw is None:
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _first_int(env: Mapping[str, str], names: tuple[str, ...], *, default: int) -> tuple[str, int]:
    for name in names:
        if _get(env, name) is not None:
            return name, _int(env, name, minimum=1)
    return names[0], default


def _port(env: Mapping[str, str], name: str, *, default: int | None, distributed: bool) -> int:
    if _get(env, name) is None and default is None:
        raise ValueError(f"{name} is not set (needed when WORLD_SIZE > 1)")
    port = _int(env, name, default=default)
    if port > 65535:
        raise ValueError(f"{name}={port} is not a port (0-65535)")
    if port == 0 and distributed:
        raise ValueError(f"{name}=0: ranks cannot meet on port 0; set a fixed port")
    return port


def _check_index(index_name: str, index: int, size_name: str, size: int) -> None:
    if size < 1:
        raise ValueError(f"{size_name}={size} must be >= 1")
    if not 0 <= index < size:
        raise ValueError(f"{index_name}={index} is not in [0, {size_name}={size})")
