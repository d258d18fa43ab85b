"""`stockpot submit` on the real Slurm cluster: submit, preempt, requeue, resume, arrays, afterok.

Every scenario is a real job submitted through the real console script; interruptions are real
Slurm actions (`scontrol requeue`, `scancel --signal=USR2`, a job on the higher-priority `high`
partition that needs the node) or a real SIGKILL of the job's processes. Each interrupted run must
resume from its newest committed checkpoint and end bit-identical to the uninterrupted one.

The cluster runs one 2-rank job at a time, so the scenarios run concurrently (one thread each):
while one job waits in the queue after a requeue, another runs. All waits are bounded. Without
Slurm accounting `job.state`/sacct are unavailable: states come from `squeue -t all`, results
from the run dirs and submitit's result pickles.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same, final_state

# The scenarios share one node and queue behind each other: their module fixture may take
# longer than the suite's per-test limit on a slow machine; each wait stays bounded by WAIT_S.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
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


# --- helpers --------------------------------------------------------------------------------


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


# --- scenarios (each runs in its own thread) --------------------------------------------------


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
    return float("nan")  # submitit requeues: read from the log


def by_high_priority_job(sub: Submitted) -> float:
    out = sub.log_dir.parent / "high.out"
    high = sh(
        "sbatch", "--parsable", "-p", "high", "-N1", "-n2", "-J", "high", "-o", str(out),
        "--wrap", "echo high ran",
    ).stdout.strip()  # fmt: skip
    sub.facts["high_job"] = high
    sub.facts["high_out"] = out
    return float("nan")


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


def array_export(root: Path) -> Submitted:
    # Different seeds are different initialisations: the soup is told they belong together.
    sub = submit(root, "sweep", *SMALL, "sweep.run.seed=[0,1,2]", "soup.enabled=true",
                 "soup.allow_unrelated=true")  # fmt: skip
    sub.facts["states"] = wait_done(*(str(j["job_id"]) for j in sub.jobs))
    return sub


def array_one_fails(root: Path) -> Submitted:
    # task.hidden=-1 passes the config (task params are the task's) and fails at start.
    sub = submit(root, "sweepfail", *SMALL, "sweep.task.hidden=[16,-1]", "soup.enabled=true")
    sub.facts["states"] = wait_done(*(str(j["job_id"]) for j in sub.jobs))
    return sub


SCENARIOS: dict[str, Callable[[Path], Submitted]] = {
    "plain": plain,
    "requeue": interrupted("requeue", by_scontrol_requeue),
    "usr2": interrupted("usr2", by_usr2),
    "high": interrupted("high", by_high_priority_job),
    "kill": interrupted("kill", by_sigkill),
    "budget": over_budget,
    "sweep": array_export,
    "sweepfail": array_one_fails,
}
FIGURES: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def scenarios(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("submit")
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(SCENARIOS)) as pool:
        futures = {name: pool.submit(run, root) for name, run in SCENARIOS.items()}
        done: dict[str, Submitted | BaseException] = {}
        for name, future in futures.items():
            try:
                done[name] = future.result()
            except BaseException as exc:  # reported by that scenario's test
                done[name] = exc
    print(f"\nslurm scenarios: {time.monotonic() - t0:.1f} s wall for {len(SCENARIOS)} scenarios")
    yield done
    _cancel_leftovers(root, done)
    for name, figures in FIGURES.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()))


def _cancel_leftovers(root: Path, done: dict[str, Any]) -> None:
    ids = [str(j["job_id"]) for p in root.rglob("jobs.json") for j in json.loads(p.read_text())]
    ids += [s.facts["high_job"] for s in done.values() if isinstance(s, Submitted)
            and "high_job" in s.facts]  # fmt: skip
    alive = [i for i in set(ids) if state(i) not in (*TERMINAL, GONE)]
    if alive:
        sh("scancel", *alive, check=False)


def scenario(done: dict[str, Any], name: str) -> Submitted:
    result = done[name]
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, Submitted)
    return result


# --- tests ----------------------------------------------------------------------------------


def test_submitted_demo_completes_on_both_ranks(scenarios: Any) -> None:
    sub = scenario(scenarios, "plain")
    assert sub.facts["state"] == "COMPLETED", sub.log()[-3000:]
    results = task_results(sub)  # returns: the ranks left after writing their pickles
    assert [(r["rank"], r["finished"], r["step"], r["restart"]) for r in results] == [
        (0, True, MAX_STEPS, 0),
        (1, True, MAX_STEPS, 0),
    ]
    latest = catalog.scan(Store(str(sub.run_dir))).latest()
    assert latest is not None and latest.manifest.world_size == 2
    assert {m["restart"] for m in metrics(sub)} == {0}
    report = sub.facts["status"]
    assert report["restarts"] == 0
    assert [(j["job_id"], j["kind"], j["state"]) for j in report["jobs"]] == [
        (sub.job_id, "train", "COMPLETED")
    ]


@pytest.mark.parametrize("name", ["requeue", "usr2", "high", "kill"])
def test_interrupted_job_requeues_and_resumes_bit_identical(scenarios: Any, name: str) -> None:
    sub = scenario(scenarios, name)
    assert sub.facts["state"] == "COMPLETED", sub.log()[-3000:]
    lines = metrics(sub)
    resumed = [m for m in lines if m.get("event") == "resumed"]
    assert [(m["restart"], m["resumes"]) for m in resumed] == [(1, 1)], resumed
    if name == "kill":  # no warning: back to the newest checkpoint committed before the kill
        assert resumed[0]["step"] == sub.facts["committed_at_kill"] >= TRIGGER_STEP
    else:  # the stop saved the very step it stopped at
        signal_name, step, save_s = stop_line(sub)
        assert signal_name == ("SIGTERM" if name == "requeue" else "SIGUSR2")
        assert resumed[0]["step"] == step
        FIGURES.setdefault(name, {})["signal->commit"] = save_s
    _record_requeue_figure(sub, name, lines)
    assert [(r["rank"], r["finished"], r["restart"]) for r in task_results(sub)] == [
        (0, True, 1),
        (1, True, 1),
    ]
    assert status_json(sub)["restarts"] == 1
    reference = scenario(scenarios, "plain")
    assert_same(
        final_state(sub.run_dir, MAX_STEPS),
        final_state(reference.run_dir, MAX_STEPS),
        f"{name} vs plain",
    )
    if name == "high":
        assert sub.facts["high_out"].read_text().strip() == "high ran"


def _record_requeue_figure(sub: Submitted, name: str, lines: list[dict[str, Any]]) -> None:
    requeued_at = sub.facts["requeued_at"]
    if requeued_at != requeued_at:  # nan: submitit requeued it; its log says when
        requeued_at = log_time(sub.log(stream="out"), "Requeued job")
    first_step = min(m["time"] for m in lines if m["restart"] == 1 and "loss" in m)
    FIGURES.setdefault(name, {})["requeue->first logged step"] = first_step - requeued_at


def test_max_requeues_is_honoured(scenarios: Any) -> None:
    sub = scenario(scenarios, "budget")
    assert sub.facts["state"] == "FAILED", sub.log()[-3000:]
    assert max(m["restart"] for m in metrics(sub)) == 1
    assert "NOT requeuing: this run is restart 1 and launcher.max_requeues=1" in sub.log()
    assert newest_step(sub.run_dir) < MAX_STEPS  # stopped for good, at a committed step
    import submitit

    job: Any = submitit.SlurmJob(folder=sub.log_dir, job_id=sub.job_id, tasks=(0, 1))
    error = job.task(0).exception()
    assert error is not None and "checkpoint function returned None" in str(error)


def test_array_and_chained_export(scenarios: Any) -> None:
    """The chained job is the soup job (launch/soup_job.py): after ALL elements, one soup of
    the three runs' final checkpoints (tests/test_soup_workflow.py has more)."""
    sub = scenario(scenarios, "sweep")
    train, chained = sub.jobs[:3], sub.jobs[3]
    assert [j["array_index"] for j in train] == [0, 1, 2]
    array_id = train[0]["job_id"].split("_")[0]
    assert [j["job_id"] for j in train] == [f"{array_id}_{i}" for i in range(3)]
    assert chained["kind"] == "soup" and chained["dependency"] == f"afterok:{array_id}"
    assert sub.facts["states"] == ["COMPLETED"] * 4
    (written,) = task_results(sub, chained["job_id"], tasks=1)
    assert written == str(sub.run_dir / "soups" / "soup")
    record = sub.run_dir / "soups" / "soup" / "SOUP.json"
    assert record.stat().st_mtime >= max(_final_commit_times(sub))  # after ALL elements
    ingredients = json.loads(record.read_text())["ingredients"]
    assert sorted(i["step"] for i in ingredients) == [20, 20, 20]
    assert sorted(i["run"] for i in ingredients) == sorted(j["run_dir"] for j in train)
    for i, record in enumerate(train):
        assert Path(record["run_dir"]).name == f"{i}-run.seed={i}"
        assert (
            json.loads((Path(record["run_dir"]) / "jobs.json").read_text())[0]["array_index"] == i
        )


def _final_commit_times(sub: Submitted) -> list[float]:
    times = []
    for record in sub.jobs[:3]:
        latest = catalog.scan(Store(record["run_dir"])).latest()
        assert latest is not None
        times.append(latest.manifest.created_at)
    return times


def test_a_failed_element_never_runs_the_chained_job(scenarios: Any) -> None:
    sub = scenario(scenarios, "sweepfail")
    # --kill-on-invalid-dep: the chained job is cancelled, never left pending forever
    assert sub.facts["states"] == ["COMPLETED", "FAILED", "CANCELLED"]
    assert "task.hidden" in sub.log(job_id=sub.jobs[1]["job_id"])
    assert not list(sub.run_dir.rglob("model.safetensors"))
    assert not (sub.log_dir / f"{sub.jobs[2]['job_id']}_0_result.pkl").exists()
