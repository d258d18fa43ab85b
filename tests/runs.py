"""Real `stockpot run` jobs for tests: run one, SIGKILL it at random steps and restart it, read
what it left (newest commit, per-step losses, resume events).

Shared by the exact-resume tests (test_resume_exact.py, test_training_options.py) and the plain
sbatch tests, so no test module imports another.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from orchestrator.checkpoint import catalog
from orchestrator.metrics import last_per_step, read_metrics
from orchestrator.storage import Store

REPO = Path(__file__).resolve().parents[1]
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
SMALL_DATA = ["task.n_train=4096", "task.n_eval=512"]
# The uninterrupted demo run of the `demo_reference` fixture (tests/fixtures/reference.py), and
# the base of the exact-resume tests' runs: a checkpoint every REFERENCE_EVERY steps, the newest
# 3 kept (the multi-rank soup tests' ingredients), with an EMA of decay 0.9 (`ema_9`): every
# exact-resume test of it checks the EMA's tensors too, and `auto` prefixes must pass it over.
REFERENCE_STEPS, REFERENCE_EVERY = 60, 4
REFERENCE = [
    "configs/demo.yaml", f"trainer.max_steps={REFERENCE_STEPS}", "trainer.log_every=1",
    "trainer.eval_every=12", f"checkpoint.every_steps={REFERENCE_EVERY}", "checkpoint.keep_last=3",
    "trainer.ema=[0.9]", *SMALL_DATA,
]  # fmt: skip


def stockpot_run(argv: Sequence[str], *, log: Path, timeout: float = 300) -> int:
    """`stockpot run ARGV`, its output appended to `log`; the exit code."""
    with open(log, "ab") as out:
        return subprocess.run(
            [STOCKPOT, "run", *argv],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        ).returncode


def newest_step(run_dir: Path | str) -> int:
    latest = catalog.scan(Store(str(run_dir))).latest()
    return latest.step if latest else 0


def losses(run_dir: Path | str) -> dict[int, float]:
    """The loss of each step, from the last line per step of metrics.jsonl."""
    return last_per_step(read_metrics(Store(str(run_dir))), "loss")


def kill_at_random_steps(
    argv: Sequence[str], run_dir: Path, kills: int, rng: random.Random, *, every: int, log: Path
) -> list[int]:
    """Start `stockpot run ARGV` and SIGKILL the whole job (spawner and ranks) a random moment
    after a checkpoint at each of `kills` random steps commits (so in the next steps, or
    mid-save); restart it after each kill; finally let it finish. `every` is the run's
    checkpoint.every_steps; the targets lie in the first half of trainer.max_steps.

    Every restarted run is killed only after it has committed a checkpoint of its own, so it
    has resumed, logged that, and flushed its `resumed` metrics event. Returns the newest
    committed step at each kill: the step each following run must resume from."""
    max_steps = int(_override(argv, "trainer.max_steps"))
    targets = sorted(rng.sample(range(every, max_steps // 2, every), kills))
    seen: list[int] = []
    for target in targets:
        job = start_job(argv, log)
        goal = max(target, seen[-1] + 1 if seen else 0)
        deadline = time.monotonic() + 240
        while newest_step(run_dir) < goal and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.08))  # a few steps on, or still inside the save
        assert job.poll() is None, f"the run ended before the kill after step {goal}"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        seen.append(newest_step(run_dir))
    assert stockpot_run(argv, log=log) == 0, log.read_text()[-3000:]
    return seen


def start_job(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """`stockpot run ARGV` in a session of its own (so one killpg ends spawner and ranks),
    its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [STOCKPOT, "run", *argv],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def kill_between_commit_and_flush(
    argv: Sequence[str], run_dir: Path, after: Sequence[int], *, log: Path
) -> list[int]:
    """Start `stockpot run ARGV` and SIGKILL the whole job at the unluckiest instant for its
    metrics: a checkpoint has committed and the leader has not flushed since (the commit's own
    line, in metrics.jsonl and TensorBoard, is still only in its memory). Once per step of
    `after` (ascending), at the first commit at or past it (and past the previous kill's)
    caught in that window; restarts after each kill; lets the last run finish. Returns the
    step of the commit each kill followed: the step each following run must resume from."""
    seen: list[int] = []
    for target in after:
        job = start_job(argv, log)
        goal = max(target, seen[-1] + 1) if seen else target
        seen.append(_stop_after_unflushed_commit(job, run_dir, goal))
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert stockpot_run(argv, log=log) == 0, log.read_text()[-3000:]
    return seen


def _stop_after_unflushed_commit(job: subprocess.Popen[bytes], run_dir: Path, goal: int) -> int:
    """Stop the job (SIGSTOP) as soon as a commit at or past `goal` shows; if its commit line
    is flushed already, let it go on (SIGCONT) to the next commit. The step it is stopped at."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the run ended before a commit >= {goal} was caught unflushed"
        if newest_step(run_dir) >= goal:
            os.killpg(job.pid, signal.SIGSTOP)
            step = newest_step(run_dir)
            records = read_metrics(Store(str(run_dir)))
            if not [r for r in records if r.get("event") == "commit" and r["step"] == step]:
                return step
            os.killpg(job.pid, signal.SIGCONT)
            goal = step + 1
        time.sleep(0.002)
    raise AssertionError(f"no commit >= {goal} caught before its flush within 240 s")


def assert_resumed_from(run_dir: Path | str, log_text: str, steps: Sequence[int]) -> None:
    """The run resumed exactly len(steps) times, from these steps in order, and never started
    from scratch again: the `resumed` events in metrics.jsonl and the leader's log lines."""
    events = [r for r in read_metrics(Store(str(run_dir))) if r.get("event") == "resumed"]
    got = [(r["step"], r["resumes"]) for r in events]
    want = [(step, n) for n, step in enumerate(steps, start=1)]
    assert got == want, f"resume events {got}, expected {want}"
    logged = [
        (int(m.group(1)), int(m.group(2)))
        for m in re.finditer(r"resumed from step (\d+) \(resume #(\d+)\)", log_text)
    ]
    assert logged == want, f"logged resumes {logged}, expected {want}"


def _override(argv: Sequence[str], key: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    assert values, f"{key} is not set in {list(argv)}"
    return values[-1]


def wait_until(ok: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s waiting for {what}"
        time.sleep(0.01)


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (its SigCgt mask): how a
    test knows a rank is past `catch_early` without asking it."""
    return _in_signal_mask(pid, "SigCgt", signum)


def ignores(pid: int, signum: int) -> bool:
    """Whether process `pid` ignores `signum` (its SigIgn mask), as data loader workers do."""
    return _in_signal_mask(pid, "SigIgn", signum)


def _in_signal_mask(pid: int, mask_name: str, signum: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line for line in status.splitlines() if line.startswith(f"{mask_name}:"))
    return bool(int(mask.split()[1], 16) >> (signum - 1) & 1)


def reached(pid: int, signum: int) -> bool:
    """Whether a signal sent to a frozen (SIGSTOPped) process got there: `signum` is pending,
    or something continued the process (Slurm sends SIGCONT with a preemption's signal), or
    the process is gone. Tests freeze ranks before a stop signal so a fast run cannot finish
    before it lands, and let them go once this is true."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return True
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return not status["State"].strip().startswith("T") or bool(pending >> (signum - 1) & 1)


def rank_pids(run_dir: Path) -> list[int]:
    """The ranks Slurm started for this run: python processes running `-m launch run ...
    run.dir=RUN_DIR` (the sbatch script's srun; on the two virtual nodes too: one PID space)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (
            Path(argv[0]).name.startswith("python")
            and argv[1:3] == ["-m", "launch"]
            and f"run.dir={run_dir}" in argv
        ):
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def frozen(pids: Sequence[int]) -> Iterator[None]:
    """The processes stopped (SIGSTOP) inside the block and continued (SIGCONT) after it, even
    when it fails: a signal sent inside lands before they train another step."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
