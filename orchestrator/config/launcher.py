"""The `launcher:` section of the config: where and how the job runs (here, or on Slurm).

Its own module to keep schema.py small; schema.Config holds it as `launcher`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.errors import require


@dataclass(frozen=True)
class LauncherConfig:
    # `local` runs here (spawned ranks); `slurm` submits through submitit.
    kind: Literal["local", "slurm"] = "local"
    # Slurm nodes.
    nodes: int = 1
    # Ranks per node.
    tasks_per_node: int = 1
    # CPU cores per rank.
    cpus_per_task: int = 1
    # GPUs per node (0 on CPU clusters).
    gpus_per_node: int = 0
    # Memory per node in GB; null uses the partition's default.
    mem_gb: float | None = None
    # Wall-clock limit of one run of the job, in minutes.
    timeout_min: int = 60
    # Slurm partition; null uses the cluster's default.
    partition: str | None = None
    # Seconds before the time limit that Slurm sends USR2, so the job can save and requeue.
    signal_delay_s: int = 120
    # Slurm account to charge; null leaves it unset.
    account: str | None = None
    # Slurm QoS; null leaves it unset.
    qos: str | None = None
    # Slurm node feature constraint (e.g. `a100`); null leaves it unset.
    constraint: str | None = None
    # Ask for whole nodes.
    exclusive: bool = False
    # Shell lines run in the sbatch script before the job (module loads, env vars).
    setup: tuple[str, ...] = ()
    # Extra sbatch parameters passed through verbatim (e.g. {"reservation": "x"}).
    additional_parameters: Mapping[str, Any] = field(default_factory=dict)
    # How many times the job may requeue itself (preemption, time-out, restarts used up).
    max_requeues: int = 3
    # How many times a transient failure (a rank killed, a lost or hung peer, storage down)
    # starts every rank again inside the same allocation; per allocation. 0: never.
    max_restarts: int = 3
    # `stockpot run`: this many seconds after every rank trained its life's first step, start
    # the next life's ranks (standbys: they import torch and stockpot, then wait; ~0.3 GB of
    # memory each). A restart after a transient failure takes them, skipping Python's start
    # and the imports (~1.3 s of a ~2.7 s restart on 2 cores). null: none. Not under Slurm.
    standby_after_s: float | None = 30.0
    # Where submitit writes job scripts, pickles and logs (a shared filesystem path).
    log_dir: str = "slurm_logs/${run.name}"

    def __post_init__(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            value = getattr(self, key)
            require(value >= 1, f"launcher.{key} must be >= 1 (got {value})")
        require(
            self.gpus_per_node >= 0,
            f"launcher.gpus_per_node must be >= 0 (got {self.gpus_per_node})",
        )
        require(
            self.mem_gb is None or self.mem_gb > 0,
            f"launcher.mem_gb must be > 0 (got {self.mem_gb}); use null for the partition default",
        )
        require(
            self.signal_delay_s >= 0,
            f"launcher.signal_delay_s must be >= 0 (got {self.signal_delay_s})",
        )
        for key in ("max_requeues", "max_restarts"):
            value = getattr(self, key)
            require(value >= 0, f"launcher.{key} must be >= 0 (got {value})")
        require(
            self.standby_after_s is None or self.standby_after_s >= 0,
            f"launcher.standby_after_s must be >= 0 or null (got {self.standby_after_s})",
        )
