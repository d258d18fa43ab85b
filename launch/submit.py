"""`stockpot submit CONFIG [key=value ...] [--dry-run]`: the config as submitit job(s).

- `launcher.kind: slurm` -> one sbatch job (`nodes x tasks_per_node` ranks) through submitit's
  SlurmExecutor; `local` -> submitit's LocalExecutor (tasks as processes here).
- A `sweep:` -> ONE array job, an element per point of the product, each in its own run.dir.
- `soup.enabled: true` -> also a chained job, `afterok` on the training job (on the whole
  array for a sweep), that makes the config's soup (launch.soup_job.SoupJob).
- Every submission is appended to `<run.dir>/jobs.json` (and to each sweep element's; the
  record is launch/jobs.py's), which `stockpot status` reads to show the jobs and their state.

Every run dir is opened as `run` opens it: `Store(run.dir, storage)`, so an S3 endpoint given
only in the config is honoured here and by the chained job (which carries each run's config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from launch.jobs import JOBS_NAME, append_jobs
from orchestrator.config import Config, expand_sweep
from orchestrator.config.soup import soup_out_dir
from orchestrator.storage import StorageOptions, Store


def submit_config(cfg: Config, *, dry_run: bool = False, out: IO[str] | None = None) -> int:
    """The CLI's `submit`: print the script (dry run) or submit and say where things go."""
    out = out or sys.stdout
    elements = expand_sweep(cfg)
    if dry_run:
        print(dry_run_text(cfg, elements), file=out)
        return 0
    records = submit(cfg, elements)
    print(summary(cfg, records), file=out)
    return 0


def log_folder(cfg: Config) -> str:
    return os.path.abspath(os.path.expanduser(cfg.launcher.log_dir))


def export_config(cfg: Config) -> Config:  # the soup job's too
    """The chained job's resources: one task on one node (it reads checkpoints, no ranks)."""
    launcher = dataclasses.replace(
        cfg.launcher, nodes=1, tasks_per_node=1, gpus_per_node=0, exclusive=False
    )
    return dataclasses.replace(cfg, launcher=launcher)


def dry_run_text(cfg: Config, elements: Sequence[Config]) -> str:
    from launch.executor import local_parameters, sbatch_text

    folder = log_folder(cfg)
    sweep = [f"# sweep: {len(elements)} elements in one array job"] if cfg.sweep else []
    sweep += [f"#   [{i}] {e.run.dir}" for i, e in enumerate(elements)] if cfg.sweep else []
    if cfg.launcher.kind == "local":
        local = json.dumps(local_parameters(cfg), sort_keys=True)
        return "\n".join([f"# launcher.kind=local: submitit's LocalExecutor, {local}", *sweep])
    array = len(elements) if cfg.sweep else None
    lines = [sbatch_text(cfg, folder, job_name=cfg.run.name, array=array).rstrip("\n"), *sweep]
    if cfg.soup.enabled:
        lines += ["", "# chained job: runs once the training job succeeds (afterok)"]
        text = sbatch_text(
            export_config(cfg),
            folder,
            job_name=f"{cfg.run.name}-soup",
            dependency="afterok:JOBID",
        )
        lines.append(text.rstrip("\n"))
    return "\n".join(lines)


def submit(cfg: Config, elements: Sequence[Config]) -> list[dict[str, Any]]:
    """Submit the training job (an array for a sweep) and the chained job; record them."""
    from launch.executor import make_executor
    from launch.job import TrainingJob
    from launch.soup_job import SoupJob

    folder = log_folder(cfg)
    executor = make_executor(cfg, folder, job_name=cfg.run.name)
    work = [TrainingJob(element.to_dict()) for element in elements]
    jobs = executor.submit_array(work) if cfg.sweep else [executor.submit(work[0])]
    records = [
        _record(job.job_id, "train", cfg, element.run.dir, i if cfg.sweep else None, None)
        for i, (job, element) in enumerate(zip(jobs, elements, strict=True))
    ]
    if cfg.soup.enabled and cfg.launcher.kind == "slurm":
        dependency = f"afterok:{jobs[0].job_id.split('_')[0]}"  # an array: all its elements
        chained = make_executor(
            export_config(cfg), folder, job_name=f"{cfg.run.name}-soup", dependency=dependency
        ).submit(SoupJob(cfg.to_dict(), [element.run.dir for element in elements]))
        records.append(_record(chained.job_id, "soup", cfg, cfg.run.dir, None, dependency))
    elif cfg.soup.enabled:
        print("stockpot: launcher.kind=local cannot chain a job (Slurm dependencies only); "
              "run `stockpot soup --config CONFIG` once training finishes", file=sys.stderr)  # fmt: skip
    _write_records(cfg, elements, records)
    return records


def _record(
    job_id: str, kind: str, cfg: Config, run_dir: str, index: int | None, dependency: str | None
) -> dict[str, Any]:
    return {
        "job_id": str(job_id),
        "kind": kind,
        "executor": cfg.launcher.kind,
        "submitted_at": round(time.time(), 3),
        "array_index": index,
        "dependency": dependency,
        "run_dir": run_dir,
        "log_dir": log_folder(cfg),
    }


def _write_records(
    cfg: Config, elements: Sequence[Config], records: Sequence[dict[str, Any]]
) -> None:
    """The sweep root lists every job; each element's run dir its own and the chained one."""
    append_jobs(Store(cfg.run.dir, cfg.storage), records)
    if cfg.sweep:
        for element in elements:
            mine = [r for r in records if r["run_dir"] == element.run.dir or r["kind"] != "train"]
            append_jobs(Store(element.run.dir, element.storage), mine)


def summary(cfg: Config, records: Sequence[dict[str, Any]]) -> str:
    lines = []
    launcher = cfg.launcher
    for r in records:
        if r["kind"] == "soup":
            lines.append(f"submitted chained job {r['job_id']} ({r['dependency']}): a "
                         f"{cfg.soup.recipe} soup to {soup_out_dir(cfg.run.dir, cfg.soup)}")  # fmt: skip
            continue
        what = "" if r["array_index"] is None else f" [array element {r['array_index']}]"
        lines.append(
            f"submitted job {r['job_id']}{what} ({launcher.kind}, {launcher.nodes} node(s) x "
            f"{launcher.tasks_per_node} task(s)): run.dir {r['run_dir']}"
        )
    first = records[0]["job_id"]
    lines.append(f"logs: {log_folder(cfg)}/{first}_<rank>_log.out and .err (requeued runs append)")
    # A URL alone is opened with the default storage settings (S3's from AWS_*); a config
    # that changes them is what opens the run dir as the jobs do.
    by_config = cfg.storage != StorageOptions()
    target = "CONFIG [key=value ...]" if by_config else cfg.run.dir
    lines.append(f"jobs recorded in {Store(cfg.run.dir).path(JOBS_NAME)}; "
                 f"follow with: stockpot status {target}")  # fmt: skip
    return "\n".join(lines)
