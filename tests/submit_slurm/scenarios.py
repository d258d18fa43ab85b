"""The `stockpot submit` scenarios on the real Slurm cluster, and the helpers that submit,
interrupt and watch their jobs.

Every scenario is a real job submitted through the real console script; interruptions are real
Slurm actions (`scontrol requeue`, `scancel --signal=USR2`, a job on the higher-priority `high`
partition that needs the node) or a real SIGKILL of the job's processes. All waits are
bounded. Without Slurm accounting `job.state`/sacct are unavailable: states come from
`squeue -t all`, results from the run dirs and submitit's result pickles.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import catalog
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests import runs

REPO = Path(__file__).resolve().parents[2]  # tests/submit_slurm/ -> the repo root
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
MAX_STEPS = 100  # ~10 s of training at 2 ranks: room to interrupt after the first commit
TRIGGER_STEP = 10  # interrupt once this step is committed
TRAIN = [
    "configs/demo-slurm.yaml", f"trainer.max_steps={MAX_STEPS}", "trainer.log_every=5",
    "trainer.eval_every=50", "checkpoint.every_steps=10", "task.n_train=4096", "task.n_eval=512",
    "launcher.tasks_per_node=2", "launcher.timeout_min=60",
]  # fmt: skip
SMALL = ["trainer.max_steps=20", "launcher.tasks_per_node=1"]  # array elements: 1 rank each
WAIT_S = 900  # the longest any single wait may take (jobs queue: the node fits one at a time)
TERMINAL = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE",
}  # fmt: skip
# squeue forgets a finished job after MinJobAge (300 s): the waits below poll every job of a
# scenario from its submission on, so each end state is seen; a job already forgotten is a
# failure of the wait, never an accepted outcome.
GONE = "NOT_IN_QUEUE"
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


@dataclass
class Submitted:
    name: str
    run_dir: Path
    log_dir: Path
    jobs: list[dict[str, Any]]
    facts: dict[str, Any] = field(default_factory=dict)  # what the scenario saw on the way

    @property
    def job_id(self) -> str:
        return str(self.jobs[0]["job_id"])

    def log(self, rank: int = 0, job_id: str | None = None, stream: str = "err") -> str:
        """A task's log; submitit's own INFO lines go to the `out` stream."""
        path = self.log_dir / f"{job_id or self.job_id}_{rank}_log.{stream}"
        return path.read_text() if path.exists() else ""


def submit(root: Path, name: str, *overrides: str) -> Submitted:
    run_dir, log_dir = root / name / "run", root / name / "logs"
    out = subprocess.run(
        [STOCKPOT, "submit", *TRAIN, f"run.name={name}", f"run.dir={run_dir}",
         f"launcher.log_dir={log_dir}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "submitted job" in out.stdout and str(log_dir) in out.stdout, out.stdout
    return Submitted(name, run_dir, log_dir, json.loads((run_dir / "jobs.json").read_text()))


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0 or not check, f"{argv}: {out.stderr}"
    return out


def state(job_id: str) -> str | None:
    """The job's state from squeue (an array's distinct states joined by ','); GONE once Slurm
    has forgotten it; None when squeue could not answer (ask again)."""
    out = sh("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T", check=False)
    states = sorted(set(out.stdout.split()))
    if out.returncode == 0:
        return ",".join(states) if states else GONE
    return GONE if "Invalid job id" in out.stderr else None


def wait_until(ok: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s waiting for {what}"
        time.sleep(0.02)


def wait_done(*job_ids: str) -> list[str]:
    """Each job's end state, polling all of them together so that none ends unobserved."""
    ended: dict[str, str] = {}

    def all_ended() -> bool:
        for job_id in job_ids:
            if job_id not in ended and (now := state(job_id)) is not None:
                assert now != GONE, f"job {job_id} left the queue before its end was seen"
                if now in TERMINAL:
                    ended[job_id] = now
        return len(ended) == len(job_ids)

    wait_until(all_ended, f"jobs {', '.join(job_ids)} to end")
    return [ended[job_id] for job_id in job_ids]


def newest_step(run_dir: Path) -> int:
    latest = catalog.scan(Store(str(run_dir))).latest()
    return latest.step if latest else 0


def wait_committed(sub: Submitted, step: int) -> None:
    wait_until(lambda: newest_step(sub.run_dir) >= step, f"{sub.name}: step {step} committed")


def metrics(sub: Submitted) -> list[dict[str, Any]]:
    return read_metrics(Store(str(sub.run_dir)))


def task_results(sub: Submitted, job_id: str | None = None, tasks: int = 2) -> list[Any]:
    import submitit

    job: Any = submitit.SlurmJob(
        folder=sub.log_dir, job_id=job_id or sub.job_id, tasks=range(tasks)
    )
    return job.results() if tasks > 1 else [job.result()]


def log_time(text: str, pattern: str) -> float:
    """Wall-clock time of the first log line matching `pattern` (logs carry local time; submitit's
    own lines read `submitit INFO (<time>) - ...`)."""
    m = re.search(rf"^(?:submitit \w+ \()?(\S+ \S+?)\)? .*{pattern}", text, re.MULTILINE)
    assert m, f"no log line matches {pattern!r}"
    return datetime.datetime.strptime(m.group(1), LOG_TIME).timestamp()


def stop_line(sub: Submitted) -> tuple[str, int, float]:
    """(signal, step, seconds from signal to commit) from the stop's log line of rank 0."""
    m = re.search(r"stop requested \((\w+)\): step (\d+) committed ([\d.]+) s after", sub.log())
    assert m, sub.log()[-3000:]
    return m.group(1), int(m.group(2)), float(m.group(3))


def status_json(sub: Submitted) -> dict[str, Any]:
    out = subprocess.run(
        [STOCKPOT, "status", str(sub.run_dir), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def plain(root: Path) -> Submitted:
    sub = submit(root, "plain")
    (sub.facts["state"],) = wait_done(sub.job_id)
    sub.facts["status"] = status_json(sub)  # while squeue still knows the job
    return sub


def interrupted(name: str, act: Callable[[Submitted], float]) -> Callable[[Path], Submitted]:
    """Submit, let step TRIGGER_STEP commit, `act` on the job (returns when it requeued it, or
    nan when submitit does), let it finish."""

    def scenario(root: Path) -> Submitted:
        sub = submit(root, name)
        wait_committed(sub, TRIGGER_STEP)
        sub.facts["signal_at"] = time.time()
        sub.facts["requeued_at"] = act(sub)
        (sub.facts["state"],) = wait_done(sub.job_id)
        return sub

    return scenario


def by_scontrol_requeue(sub: Submitted) -> float:
    sh("scontrol", "requeue", sub.job_id)
    return time.time()


def by_usr2(sub: Submitted) -> float:
    sh("scancel", "--signal=USR2", sub.job_id)
    return float("nan")  # the supervisor requeues: read from the log


def path_without_scontrol(root: Path) -> Path:
    """A directory of links to everything on the PATH except scontrol: what the ranks see in a
    container without Slurm's binaries (srun is still reachable from the batch shell)."""
    bare = root / "no-scontrol-bin"
    bare.mkdir(exist_ok=True)
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(folder).iterdir() if Path(folder).is_dir() else ():
            if tool.name != "scontrol" and not (bare / tool.name).exists():
                (bare / tool.name).symlink_to(tool)
    return bare


def usr2_without_scontrol(root: Path) -> Submitted:
    """USR2 to a job whose setup takes scontrol off the PATH (and says so in its log)."""
    bare = path_without_scontrol(root)
    setup = f'launcher.setup=["export PATH={bare}","command -v scontrol || echo NO-SCONTROL"]'
    sub = submit(root, "usr2", setup)
    wait_committed(sub, TRIGGER_STEP)
    sub.facts["signal_at"] = time.time()
    sub.facts["requeued_at"] = by_usr2(sub)
    (sub.facts["state"],) = wait_done(sub.job_id)
    return sub


CRASH_STEP = TRIGGER_STEP + 5


def crashed_rank(root: Path) -> Submitted:
    """Rank 1 SIGKILLs itself once at step CRASH_STEP (tests/fault_tasks.py): the supervisor
    starts both ranks again inside the allocation, no requeue."""
    marker = root / "crash-fault"
    sub = submit(root, "crash", "task._target_=tests.fault_tasks.Faulty", "task.fault=kill",
                 f"task.at_step={CRASH_STEP}", f"task.once={marker}")  # fmt: skip
    (sub.facts["state"],) = wait_done(sub.job_id)
    sub.facts["fault"] = marker.read_text() if marker.exists() else ""
    sub.facts["status"] = status_json(sub)
    return sub


def by_high_priority_job(sub: Submitted) -> float:
    """Submit a job to the `high` partition that needs the node. The ranks are frozen (SIGSTOP)
    until Slurm acts on the preemption (it sends SIGCONT with the job's --signal), so a loaded
    machine cannot finish the run before the preemption lands; they are let go after at most
    120 s in any case, and the test then asserts the resume that proves it landed."""
    out = sub.log_dir.parent / "high.out"
    ranks = task_pids(sub.job_id)
    with runs.frozen(ranks):
        high = sh(
            "sbatch", "--parsable", "-p", "high", "-N1", "-n2", "-J", "high", "-o", str(out),
            "--wrap", "echo high ran",
        ).stdout.strip()  # fmt: skip
        wait_until(
            lambda: any(runs.reached(pid, signal.SIGUSR2) for pid in ranks),
            "the preemption's signal",
            timeout=120,
        )
    sub.facts["high_job"] = high
    sub.facts["high_out"] = out
    return float("nan")


def task_pids(job_id: str) -> list[int]:
    """The job's task processes (the ranks): `scontrol listpids` rows of a step's local tasks."""
    rows = [line.split() for line in sh("scontrol", "listpids", job_id).stdout.splitlines()[1:]]
    pids = [int(row[0]) for row in rows if len(row) >= 4 and row[2] != "batch" and row[3] != "-"]
    assert pids, f"no task processes for job {job_id}"
    return pids


def by_sigkill(sub: Submitted) -> float:
    """SIGKILL every process of the job (batch script, srun, ranks) at once, then requeue it:
    what a node crash looks like, with no signal to save on."""
    lines = sh("scontrol", "listpids", sub.job_id).stdout.splitlines()[1:]
    pids = [int(line.split()[0]) for line in lines if line.split()]
    assert pids, f"no processes for job {sub.job_id}"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), "killed processes")
    sub.facts["committed_at_kill"] = newest_step(sub.run_dir)
    wait_until(lambda: sh("scontrol", "requeue", sub.job_id, check=False).returncode == 0,
               f"scontrol requeue {sub.job_id} after the kill", timeout=30)  # fmt: skip
    return time.time()


def over_budget(root: Path) -> Submitted:
    """launcher.max_requeues=1: the first USR2 requeues, the second does not."""
    sub = submit(root, "budget", "launcher.max_requeues=1")
    wait_committed(sub, TRIGGER_STEP)
    sh("scancel", "--signal=USR2", sub.job_id)
    wait_until(lambda: any(m.get("restart") == 1 for m in metrics(sub)), "budget: the rerun")
    sh("scancel", "--signal=USR2", sub.job_id)
    (sub.facts["state"],) = wait_done(sub.job_id)
    return sub


EXAMPLE_STEPS = 40  # the examples on Slurm: a user's own loop, preempted (tests/test_examples)
EXAMPLE = [
    "launcher.kind=slurm", "launcher.partition=debug", "launcher.tasks_per_node=2",
    f"trainer.max_steps={EXAMPLE_STEPS}", "checkpoint.every_steps=5", "trainer.log_every=1",
    "logging.tensorboard=false",
]  # fmt: skip


def example_preempted(example: str) -> Callable[[Path], Submitted]:
    """examples/<example>/config.yaml submitted as a user would, preempted by a job on the
    `high` partition once step 10 is committed, left to finish."""

    def scenario(root: Path) -> Submitted:
        name = f"{example}_high"
        run_dir, log_dir = root / name / "run", root / name / "logs"
        out = subprocess.run(
            [STOCKPOT, "submit", f"examples/{example}/config.yaml", *EXAMPLE, f"run.name={name}",
             f"run.dir={run_dir}", f"launcher.log_dir={log_dir}"],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        jobs = json.loads((run_dir / "jobs.json").read_text())
        sub = Submitted(name, run_dir, log_dir, jobs)
        wait_committed(sub, TRIGGER_STEP)
        sub.facts["requeued_at"] = by_high_priority_job(sub)
        (sub.facts["state"],) = wait_done(sub.job_id)
        return sub

    return scenario


def array_one_fails(root: Path) -> Submitted:
    # task.hidden=-1 passes the config (task params are the task's) and fails at start.
    sub = submit(root, "sweepfail", *SMALL, "sweep.task.hidden=[16,-1]", "soup.enabled=true")
    sub.facts["states"] = wait_done(*(str(j["job_id"]) for j in sub.jobs))
    return sub


SCENARIOS: dict[str, Callable[[Path], Submitted]] = {
    "plain": plain,
    "requeue": interrupted("requeue", by_scontrol_requeue),
    "usr2": usr2_without_scontrol,
    "crash": crashed_rank,
    "high": interrupted("high", by_high_priority_job),
    "kill": interrupted("kill", by_sigkill),
    "budget": over_budget,
    "sweepfail": array_one_fails,
    "nanogpt_high": example_preempted("nanogpt"),
    "hf_gpt2_high": example_preempted("hf_gpt2"),
}
FIGURES: dict[str, dict[str, float]] = {}


def scenario(done: dict[str, Any], name: str) -> Submitted:
    result = done[name]
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, Submitted)
    return result
