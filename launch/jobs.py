"""The jobs record of a run: `<run.dir>/jobs.json`, what `stockpot submit` submitted there.

`submit` appends one record per job (a JSON list); `status` reads them back and asks the
scheduler for each job's state now. Nothing else reads or writes the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.storage import Store

JOBS_NAME = "jobs.json"
SQUEUE_TIMEOUT_S = 10


def read_jobs(run: Store) -> list[dict[str, Any]]:
    """The records in `run`'s jobs.json, oldest first; [] when there is none."""
    try:
        data = json.loads(run.read_bytes(JOBS_NAME))
    except FileNotFoundError:
        return []
    return list(data) if isinstance(data, list) else []


def append_jobs(run: Store, records: Sequence[Mapping[str, Any]]) -> None:
    """Append to `<run>/jobs.json` (read, extend, write whole: one submitter at a time)."""
    run.write_bytes(JOBS_NAME, json.dumps([*read_jobs(run), *records], indent=1).encode())


def job_state(job: Mapping[str, Any]) -> str:
    """Slurm's state of a recorded job (`squeue -t all`): PENDING, RUNNING, COMPLETED, ...;
    NOT_IN_QUEUE once Slurm has forgotten it (MinJobAge) or for an unknown id; UNKNOWN when
    Slurm cannot be asked from here."""
    job_id = str(job.get("job_id", ""))
    if job.get("executor") == "local":
        return _local_state(job_id)
    if shutil.which("squeue") is None:
        return "UNKNOWN"
    try:
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
            capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    states = sorted(set(out.stdout.split()))
    if out.returncode != 0 or not states:
        return "NOT_IN_QUEUE"
    return ",".join(states)  # an array's elements may differ


def _local_state(pid: str) -> str:
    """A LocalExecutor job id is its controller's pid on the submitting machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return "NOT_RUNNING"
    except PermissionError:
        pass
    return "RUNNING"
