"""Config -> submitit: the sbatch parameters (pure, pinned by golden files) and the executor.

`launcher.*` maps onto submitit's SlurmExecutor parameters one to one; submitit then writes the
sbatch script (`_make_sbatch_string`), which is also what `stockpot submit --dry-run` prints.
Two settings are always added: `--requeue`, so Slurm may put the job back in the queue after a
preemption (and `scontrol requeue` works on it), and `--open-mode=append`, so a requeued run
appends to its logs instead of truncating the earlier run's.

submitit is imported inside the functions that need it: the CLI starts without it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import Config
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from submitit.core.core import Executor

# What `--dry-run` and the golden files show instead of the real log folder.
PLACEHOLDER_FOLDER = "/LOG_DIR"
# The supervisor's first line, before launcher.setup, which may change PATH (a container's).
SCONTROL_FIRST = ["STOCKPOT_SCONTROL=$(command -v scontrol || true)  # stockpot: for requeues"]
# Always passed to sbatch; a user's launcher.additional_parameters are merged on top.
ALWAYS = {"requeue": True, "open-mode": "append"}
# launcher fields with their own key: additional_parameters must not set these behind their back.
_OWN_FIELDS = {
    "partition": "partition", "nodes": "nodes", "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task", "gpus-per-node": "gpus_per_node", "mem": "mem_gb",
    "time": "timeout_min", "signal": "signal_delay_s", "account": "account", "qos": "qos",
    "constraint": "constraint", "exclusive": "exclusive", "array": "(sweep:)",
}  # fmt: skip


def slurm_parameters(
    cfg: Config,
    *,
    job_name: str,
    dependency: str | None = None,
    folder: str | Path = PLACEHOLDER_FOLDER,
    python: str | None = None,
) -> dict[str, Any]:
    """`launcher.*` as submitit SlurmExecutor parameters (what `update_parameters` takes).

    A training job (no `dependency`) runs its ranks under stockpot's supervisor
    (launch/supervise.py): the script's setup ends with it, and it exits before submitit's own
    srun line. The chained soup job runs as submitit writes it.

    With a `dependency` (`afterok:<id>`) the job also gets `--kill-on-invalid-dep=yes`: when the
    training job fails, Slurm removes the dependent job instead of leaving it pending forever
    with reason DependencyNeverSatisfied.
    """
    launcher = cfg.launcher
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": launcher.nodes,
        "ntasks_per_node": launcher.tasks_per_node,
        "cpus_per_task": launcher.cpus_per_task,
        "time": launcher.timeout_min,
        "signal_delay_s": launcher.signal_delay_s,
        "additional_parameters": {**ALWAYS, **_extra(launcher.additional_parameters)},
    }
    optional = {
        "partition": launcher.partition,
        "gpus_per_node": launcher.gpus_per_node or None,
        "mem": mem_string(launcher.mem_gb) if launcher.mem_gb is not None else None,
        "account": launcher.account,
        "qos": launcher.qos,
        "constraint": launcher.constraint,
        "exclusive": True if launcher.exclusive else None,
        "setup": list(launcher.setup) or None,
    }
    if dependency is None:
        from launch.supervise import slurm_supervisor

        command = submit_command(folder, python)
        optional["setup"] = [
            *SCONTROL_FIRST,
            *launcher.setup,
            *slurm_supervisor(cfg, folder, command),
        ]
    params.update({key: value for key, value in optional.items() if value is not None})
    if dependency is not None:
        params["dependency"] = dependency
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    return params


def mem_string(mem_gb: float) -> str:
    """Memory per node as sbatch wants it: whole GB as `16G`, else MB (`1.5` -> `1536M`)."""
    return f"{int(mem_gb)}G" if mem_gb == int(mem_gb) else f"{round(mem_gb * 1024)}M"


def _extra(additional: Any) -> dict[str, Any]:
    for key in additional:
        flag = str(key).replace("_", "-")
        if flag in _OWN_FIELDS:
            raise ConfigError(
                f"launcher.additional_parameters.{key}: set launcher.{_OWN_FIELDS[flag]} instead"
            )
    return dict(additional)


def local_parameters(cfg: Config) -> dict[str, Any]:
    """The subset submitit's LocalExecutor understands (one node, tasks as local processes)."""
    launcher = cfg.launcher
    if launcher.nodes != 1:
        raise ConfigError(
            f"launcher.kind=local runs on this machine only: launcher.nodes must be 1 "
            f"(got {launcher.nodes}); use launcher.kind=slurm for several nodes"
        )
    params: dict[str, Any] = {
        "tasks_per_node": launcher.tasks_per_node,
        "timeout_min": launcher.timeout_min,
        "signal_delay_s": launcher.signal_delay_s,
        "gpus_per_node": launcher.gpus_per_node,
    }
    if launcher.setup:
        params["setup"] = list(launcher.setup)
    return params


def submit_command(folder: str | Path, python: str | None = None) -> str:
    """The command each task runs: submitit's job runner on the pickles in `folder`."""
    python = shlex.quote(sys.executable) if python is None else python
    return f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def sbatch_text(
    cfg: Config,
    folder: str | Path = PLACEHOLDER_FOLDER,
    *,
    job_name: str,
    python: str | None = None,
    array: int | None = None,
    dependency: str | None = None,
) -> str:
    """The sbatch script submitit would write for `cfg` (an array of `array` tasks if given)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(
        cfg, job_name=job_name, dependency=dependency, folder=folder, python=python
    )
    return _make_sbatch_string(
        command=submit_command(folder, python), folder=folder, map_count=array, **params
    )


def make_executor(
    cfg: Config, folder: str | Path, *, job_name: str | None = None, dependency: str | None = None
) -> Executor:
    """A submitit executor for `cfg`: SlurmExecutor for `launcher.kind: slurm`, else the
    LocalExecutor. Time-out requeues are capped by `launcher.max_requeues` (submitit's
    `max_num_timeout`); `TrainingJob.checkpoint` caps every requeue the same way."""
    import submitit

    launcher = cfg.launcher
    executor: Executor
    if launcher.kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launcher.max_requeues)
        name = job_name or cfg.run.name
        params = slurm_parameters(
            cfg, job_name=name, dependency=dependency, folder=folder, python=executor.python
        )
        executor.update_parameters(**params)
    else:
        if dependency is not None:
            raise ConfigError("launcher.kind=local cannot chain jobs (Slurm dependencies only)")
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=launcher.max_requeues)
        executor.update_parameters(**local_parameters(cfg))
    return executor
