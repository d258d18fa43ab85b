"""Process and machine faults: SIGKILL (a rank or the whole job), a full disk, a hung rank.

Each scenario takes a fresh run dir, breaks a real `stockpot run` job, checks what it left, runs
it again to the end, and ends with `jobs.judge` (bit-identical to the uninterrupted run).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from bench.chaos import jobs
from bench.chaos.jobs import EVERY, MAX_STEPS, Trial, argv_for, check
from orchestrator.checkpoint.format import CHECKPOINTS_DIR, TMP_PREFIX
from orchestrator.storage import Store

KILL_VARIANTS = ("ddp-sync", "fsdp-async", "ddp-async", "fsdp-sync")
# kill and hang judge the next `stockpot run`'s resume: no restart inside the job (one killed or
# stopped rank would be restarted there, and the resume judged would be the finished run's).
# The restarts themselves are crashes.py's.
NO_RESTART = "launcher.max_restarts=0"
HANG_TIMEOUT_S = 15  # trainer.collective_timeout_s in the hung-rank trial
DISK_MB = 16  # the tmpfs the full-disk trial runs on
DISK_LEFT = 200_000  # bytes left free once filled: metrics lines fit, a checkpoint does not


def variant_args(variant: str) -> list[str]:
    parallel, mode = variant.split("-")
    return [f"trainer.parallel={parallel}", f"checkpoint.async_save={str(mode == 'async').lower()}"]


def kill(trial: Trial, work: Path, refs, rng: random.Random) -> None:
    """SIGKILL a random rank or the whole job, usually while a save is in flight; resume."""
    run_dir = str(work / "run")
    store, log = Store(run_dir), work / "run.log"
    argv = argv_for(run_dir, *variant_args(trial.variant), NO_RESTART)
    target = rng.randrange(EVERY, MAX_STEPS - EVERY, EVERY)
    job = jobs.start(argv, log)
    try:
        jobs.wait_for(lambda: jobs.newest_step(store) >= target, job, f"a commit at {target}")
        if rng.random() < 0.7:  # weighted toward saves and commits
            jobs.wait_for(lambda: jobs.saving_now(run_dir), job, "a save in progress", 60)
        time.sleep(rng.uniform(0.0, 0.05))
        whole = rng.random() < 0.5
        trial.notes["killed"] = "job" if whole else "one rank"
        if whole:
            os.killpg(job.pid, signal.SIGKILL)
        else:
            pids = jobs.ranks_of(job)
            check(bool(pids), "no rank processes to kill")
            os.kill(pids[rng.randrange(len(pids))], signal.SIGKILL)
        trial.kills += 1
        job.wait(timeout=120)
    finally:
        jobs.kill_job(job)
    at_kill = jobs.newest_step(store)
    jobs.verify_all(store)
    jobs.finish(argv, work / "resume.log")
    check(jobs.resumed_from(work / "resume.log") == [at_kill], f"not resumed from {at_kill}")
    jobs.judge(store, refs(trial.variant.split("-")[0]), work / "resume.log")


@contextlib.contextmanager
def small_disk(where: Path):
    """A tmpfs of DISK_MB mounted at `where` (root only), unmounted however the trial ends."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(where)],
                   check=True)  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes with one file; returns it (remove it to free)."""
    filler = disk / "filler.bin"
    with open(filler, "wb") as f:
        while (free := os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize) > leave:
            f.write(b"\0" * min(1 << 20, free - leave))
            f.flush()
    return filler


def disk_full(trial: Trial, work: Path, refs, rng: random.Random) -> None:
    """The disk fills after a commit: the next save fails with one clear line, the run stops
    (exit 1), the previous checkpoint stays whole and the failed attempt is gone; with space
    back, a rerun resumes and ends bit-identical."""
    with small_disk(work / "disk") as disk:
        run_dir = str(disk / "run")
        store, log = Store(run_dir), work / "run.log"
        argv = argv_for(run_dir, "trainer.parallel=ddp")
        job = jobs.start(argv, log)
        try:
            jobs.wait_for(lambda: jobs.newest_step(store) >= EVERY, job, "a first commit")
            filler = fill(disk, DISK_LEFT)
            trial.faults += 1
            code = job.wait(timeout=120)
        finally:
            jobs.kill_job(job)
        text = log.read_text(errors="replace")
        check(code not in (0, -9), f"the job exited {code} on a full disk")
        check(text.count("no space left on device writing") == 1, "no one clear ENOSPC line")
        check("Traceback" not in text, "a traceback on a full disk")
        scan = jobs.verify_all(store)
        check(bool(scan.committed), "the previous checkpoint is gone")
        left = [p.name for p in (Path(run_dir) / CHECKPOINTS_DIR).iterdir()]
        check(not [n for n in left if n.startswith(TMP_PREFIX)], f"temp dirs left: {left}")
        at_stop = jobs.newest_step(store)
        filler.unlink()
        jobs.finish(argv, work / "resume.log")
        check(jobs.resumed_from(work / "resume.log") == [at_stop], f"not resumed from {at_stop}")
        jobs.judge(store, refs("ddp"), work / "resume.log")


def hung_rank(trial: Trial, work: Path, refs, rng: random.Random) -> None:
    """SIGSTOP one rank: the others give up within trainer.collective_timeout_s and the job
    exits non-zero; a rerun resumes from the last commit."""
    run_dir = str(work / "run")
    store, log = Store(run_dir), work / "run.log"
    argv = argv_for(run_dir, "trainer.parallel=ddp", NO_RESTART)
    job = jobs.start([*argv, f"trainer.collective_timeout_s={HANG_TIMEOUT_S}"], log)
    try:
        jobs.wait_for(lambda: jobs.newest_step(store) >= EVERY, job, "a first commit")
        pids = jobs.ranks_of(job)
        check(len(pids) == 2, f"expected 2 ranks, found {pids}")
        victim = rng.randrange(2)
        os.kill(pids[victim], signal.SIGSTOP)
        trial.faults += 1
        t0 = time.monotonic()
        try:
            code = job.wait(timeout=HANG_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            raise jobs.TrialFailed(f"still waiting {HANG_TIMEOUT_S + 60} s after SIGSTOP") from None
        trial.notes["noticed_s"] = round(time.monotonic() - t0, 1)
        check(code != 0, "the job exited 0 with a stopped rank")
    finally:
        jobs.kill_job(job)
        for pid in jobs.ranks_of(job):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    at_stop = jobs.newest_step(store)
    jobs.verify_all(store)
    check("Traceback" not in log.read_text(errors="replace"), "a traceback from a hung rank")
    jobs.finish(argv, work / "resume.log")
    check(jobs.resumed_from(work / "resume.log") == [at_stop], f"not resumed from {at_stop}")
    jobs.judge(store, refs("ddp"), work / "resume.log")
