"""Tiered checkpoints (`checkpoint.local_dir`) broken on purpose: every save commits on the node
first and a background upload makes it durable in run.dir (orchestrator/checkpoint/tiered.py).

tier-kill    SIGKILL the whole job after a local commit, with uploads capped so that the kill
             often cuts one: the durable tier verifies (`stockpot verify`) and holds no commit
             of a cut step; the restart restores the newest local commit from the node's copy.
tier-wipe    SIGKILL after a durable commit, wipe the node's dir: the restart restores the
             durable tier's newest step.
tier-outage  run.dir on S3; every checkpoint request fails (503) for 2-3 saves (sometimes on
             past the run's end), from the start or from the first durable commit (then half
             the time every request of the bucket, metrics and TensorBoard too): training goes
             on, the steps at risk grow and are recorded, and once S3 answers the uploads catch
             up (the final step durable) and the held metrics lines are written. One run,
             exit 0.
tier-stop    USR2 at a random step: exit 75 with the stop's step durable; the next run resumes
             from it (from the durable tier alone when the node's dir is wiped in between).

Each ends bit-identical (weights and optimizer state) to the uninterrupted run without tiers.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench.chaos import jobs
from bench.chaos.faults import KILL_VARIANTS, NO_RESTART, variant_args
from bench.chaos.jobs import EVERY, MAX_STEPS, STATE, Trial, argv_for, check
from devtools.s3server import FaultProxy
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.format import CHECKPOINTS_DIR, TMP_PREFIX
from orchestrator.env import EXIT_STOPPED
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store

TIER_VARIANTS = {
    "tier-kill": KILL_VARIANTS,
    "tier-wipe": KILL_VARIANTS,
    "tier-outage": ("ddp-sync", "fsdp-async"),
    "tier-stop": KILL_VARIANTS,
}
# checkpoint.upload_mb_s per rank (a checkpoint is ~1 MB, half of it each rank's): uncapped,
# or slow enough that an upload takes about as long as the whole 24-step run.
CAPS = (None, 1.0, 4.0)
GRACE_S = 60  # launcher.signal_delay_s in tier-stop: the flush has all it needs
# The task of tier-stop and tier-outage: the demo's numbers at >= 50 ms a step, so that a stop
# lands before the run's end (see tests/fault_tasks.py's Paced) and an outage can begin after a
# durable commit and span a few saves; 24 steps take ~1.2 s more.
PACED = ("task._target_=tests.fault_tasks.Paced", "task.step_s=0.05")
CUT = re.compile(rf"^{re.escape(TMP_PREFIX)}step-(\d+)-")
RESTORED = re.compile(r"restored step (\d+) from the (\S+) tier")


def tier_argv(run_dir: str, local: Path, variant: str, *extra: str) -> list[str]:
    return argv_for(run_dir, *variant_args(variant), NO_RESTART,
                    f"checkpoint.local_dir={local}", *extra)  # fmt: skip


def cap_args(cap: float | None) -> list[str]:
    return [f"checkpoint.upload_mb_s={cap}"] if cap else []


def local_steps(local: Path) -> list[int]:
    return [c.step for c in catalog.scan(Store(str(local))).committed]


def newest_local(local: Path) -> int:
    return max(local_steps(local), default=0)


def cut_uploads(run_dir: Path) -> list[int]:
    """Steps whose durable attempt (a temp dir in run.dir, on local disk) holds files: an
    upload under way, or cut by a kill."""
    root = run_dir / CHECKPOINTS_DIR
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = CUT.match(p.name)
        if m and p.is_dir() and any(p.iterdir()):
            found.append(int(m.group(1)))
    return found


def restored(log: Path) -> list[tuple[int, str]]:
    """(step, tier) of each "restored step N from the T tier" line in `log`."""
    return [(int(s), t) for s, t in RESTORED.findall(log.read_text(errors="replace"))]


def stockpot_verify(run_dir: Path) -> None:
    done = subprocess.run([jobs.STOCKPOT, "verify", str(run_dir)], capture_output=True,
                          text=True, cwd=jobs.REPO)  # fmt: skip
    check(done.returncode == 0, f"stockpot verify exited {done.returncode}: {done.stdout[-300:]}")


def kill_now(trial: Trial, job: subprocess.Popen) -> None:
    """SIGKILL the whole job, which must still be running."""
    check(job.poll() is None, f"the job exited ({job.returncode}) before the kill")
    os.killpg(job.pid, signal.SIGKILL)
    trial.kills += 1
    job.wait(timeout=120)


def resume(trial: Trial, work: Path, argv: list[str], step: int, tier: str, refs) -> None:
    """Run again to the end: it restores `step` from `tier` and ends bit-identical."""
    log = work / "resume.log"
    jobs.finish(argv, log)
    check(restored(log) == [(step, tier)], f"restored {restored(log)}, not step {step} ({tier})")
    check(jobs.resumed_from(log) == [step], f"resumed from {jobs.resumed_from(log)}, not {step}")
    jobs.judge(Store(argv_dir(argv)), refs(trial.variant.split("-")[0]), log, parts=STATE)


def argv_dir(argv: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith("run.dir="))


def kill(trial: Trial, work: Path, refs, rng: random.Random) -> None:
    """tier-kill: see the module's docstring."""
    run_dir, local, log = work / "run", work / "node", work / "run.log"
    cap = CAPS[rng.randrange(len(CAPS))]
    mid_upload = cap is not None and rng.random() < 0.7
    target = rng.randrange(EVERY, MAX_STEPS - EVERY, EVERY)
    trial.notes.update(cap=cap, target=target)
    argv = tier_argv(str(run_dir), local, trial.variant, *cap_args(cap))
    job = jobs.start(argv, log)
    try:
        jobs.wait_for(lambda: newest_local(local) >= target, job, f"a local commit at {target}")
        if mid_upload:
            jobs.wait_for(lambda: bool(cut_uploads(run_dir)), job, "an upload under way", 60)
        time.sleep(rng.uniform(0.0, 0.05))
        kill_now(trial, job)
    finally:
        jobs.kill_job(job)
    cut, at_local = cut_uploads(run_dir), newest_local(local)
    store = Store(str(run_dir))
    durable = [c.step for c in catalog.scan(store).committed]
    trial.notes.update(local=at_local, durable=max(durable, default=0), cut=cut)
    trial.faults += bool(cut)  # an upload cut by the kill
    check(not set(cut) & set(durable), f"steps {cut} committed durable and cut mid-upload")
    check(at_local >= max(durable, default=0), f"local {at_local} older than durable {durable}")
    stockpot_verify(run_dir)
    jobs.verify_all(store)
    resume(trial, work, argv, at_local, "local", refs)


def wipe(trial: Trial, work: Path, refs, rng: random.Random) -> None:
    """tier-wipe: see the module's docstring."""
    run_dir, local, log = work / "run", work / "node", work / "run.log"
    cap = CAPS[rng.randrange(len(CAPS))] if rng.random() < 0.5 else None
    target = rng.randrange(EVERY, MAX_STEPS - EVERY, EVERY)
    trial.notes.update(cap=cap, target=target)
    argv = tier_argv(str(run_dir), local, trial.variant, *cap_args(cap))
    store = Store(str(run_dir))
    job = jobs.start(argv, log)
    try:
        jobs.wait_for(lambda: newest_local(local) >= target and jobs.newest_step(store) > 0,
                      job, f"a local commit at {target} and a durable one")  # fmt: skip
        time.sleep(rng.uniform(0.0, 0.05))
        kill_now(trial, job)
    finally:
        jobs.kill_job(job)
    durable, held = jobs.newest_step(store), local_steps(local)
    trial.notes.update(durable=durable, wiped=held)
    check(bool(held), "the node's dir held no commit to wipe")
    shutil.rmtree(local)
    trial.faults += 1
    stockpot_verify(run_dir)
    resume(trial, work, argv, durable, "durable", refs)


def stop(trial: Trial, work: Path, refs, rng: random.Random) -> None:
    """tier-stop: see the module's docstring."""
    run_dir, local, log = work / "run", work / "node", work / "run.log"
    cap = CAPS[rng.randrange(len(CAPS))]
    at, wiped = rng.randrange(1, MAX_STEPS - 2 * EVERY), rng.random() < 0.5
    trial.notes.update(cap=cap, at=at, wiped=wiped)
    argv = tier_argv(str(run_dir), local, trial.variant, *cap_args(cap), *PACED,
                     f"launcher.signal_delay_s={GRACE_S}")  # fmt: skip
    job = jobs.start(argv, log)
    try:
        jobs.wait_for(lambda: f"step {at}/{MAX_STEPS}" in log.read_text(errors="replace"),
                      job, f"step {at}")  # fmt: skip
        job.send_signal(signal.SIGUSR2)
        trial.faults += 1
        code = job.wait(timeout=120)
    finally:
        jobs.kill_job(job)
    text = log.read_text(errors="replace")
    check(code == EXIT_STOPPED, f"the stopped job exited {code}, not {EXIT_STOPPED}")
    said = [int(s) for s in re.findall(r"stop requested \(\S+\): step (\d+) committed", text)]
    store = Store(str(run_dir))
    durable = jobs.newest_step(store)
    trial.notes.update(stopped=said, durable=durable)
    check(len(said) == 1, f"{len(said)} stop lines, not one")
    check(newest_local(local) == said[0], f"newest local {newest_local(local)}, stop {said[0]}")
    check(durable == said[0], f"the stop's step {said[0]} is not durable (newest: {durable})")
    check("committed on the local tier only" not in text, "a not-durable line at the stop")
    stockpot_verify(run_dir)
    if wiped:
        shutil.rmtree(local)
    resume(trial, work, argv, said[0], "durable" if wiped else "local", refs)


def outage(trial: Trial, work: Path, refs, rng: random.Random, s3) -> None:
    """tier-outage: see the module's docstring; `s3`: the chaos S3 environment."""
    bucket = s3.bucket()
    url, local, log = f"{bucket}/run", work / "node", work / "run.log"
    after_durable, span = rng.random() < 0.5, rng.randrange(2, 4) * EVERY
    past_end = rng.random() < 0.3  # and on after training ended, through two failed uploads
    # A run cannot start without run.dir: a whole-bucket outage begins after a durable commit.
    whole = after_durable and rng.random() < 0.5
    failing = f"/{bucket.removeprefix('s3://')}" if whole else f"/{CHECKPOINTS_DIR}/"
    trial.notes.update(after_durable=after_durable, span=span, past_end=past_end, whole=whole)
    proxy = FaultProxy(upstream=s3._up()).start()
    argv = tier_argv(url, local, trial.variant, "storage.s3.max_attempts=1", *PACED)
    try:
        store = _store(url, s3)
        job = jobs.start(argv, log, s3.env(proxy.endpoint_url))
        try:
            if after_durable:  # else from the start: no step durable before it
                jobs.wait_for(lambda: jobs.newest_step(store) > 0, job, "a durable commit")
            proxy.fail(failing, status=503, times=None)
            began, before = newest_local(local), proxy.seen(failing)
            # Until 2-3 saves and one failed upload (a fast run's first upload may come late).
            jobs.wait_for(lambda: newest_local(local) >= began + span and failed_uploads(log) > 0,
                          job, "commits and a failed upload in the outage")  # fmt: skip
            if past_end:
                jobs.wait_for(lambda: newest_local(local) == MAX_STEPS and failed_uploads(log) >= 2,
                              job, "two failed uploads after the final commit")  # fmt: skip
            failed = proxy.seen(failing) - before  # each answered 503
            ended, durable = newest_local(local), jobs.newest_step(store)
            with proxy._lock:
                proxy.rules.clear()
            code = job.wait(timeout=jobs.RUN_TIMEOUT_S)
        finally:
            jobs.kill_job(job)
    finally:
        proxy.stop()
    _judge_outage(trial, log, code, store, (began, ended, durable), failed)
    if whole:
        text = log.read_text(errors="replace")
        check("metrics: cannot append" in text, "the metrics were never held in the outage")
        check("held line(s) written" in text, "the held metrics lines were not written")
        logged = {r["step"] for r in read_metrics(store) if "loss" in r}
        want = set(range(1, MAX_STEPS + 1))  # trainer.log_every=1
        check(logged >= want, f"metrics.jsonl lacks the losses of steps {sorted(want - logged)}")
    jobs.judge(store, refs(trial.variant.split("-")[0]), log, parts=STATE)


def _judge_outage(
    trial: Trial, log: Path, code: int, store: Store, seen: tuple[int, int, int], failed: int
) -> None:
    """Training went on through the outage on the local tier, the steps at risk were recorded
    growing past one save's worth, and the uploads caught up once it ended."""
    began, ended, durable = seen
    failures = failed_uploads(log)
    trial.faults += failures
    trial.notes.update(began=began, ended=ended, durable_then=durable, failures=failures,
                       requests_failed=failed)  # fmt: skip
    check(code == 0, f"the run exited {code} after the outage")
    check(failures >= 1, "no failed upload logged during the outage")
    check(ended - durable >= 2 * EVERY, f"local {ended}, durable {durable}: no steps at risk")
    risk = {r["step"]: r.get("checkpoint/steps_at_risk") for r in read_metrics(store)
            if r.get("event") == "commit"}  # fmt: skip
    check(
        risk.get(ended, 0) >= ended - durable,
        f"step {ended} recorded {risk.get(ended)} steps at risk, not >= {ended - durable}",
    )
    check(jobs.newest_step(store) == MAX_STEPS, f"the final step is not durable: {risk}")
    check(any(r.get("event") == "durable" and r["step"] == MAX_STEPS for r in read_metrics(store)),
          "no durable event of the final step")  # fmt: skip


def failed_uploads(log: Path) -> int:
    text = log.read_text(errors="replace")
    return len(re.findall(r"upload of step \d+ to \S+ failed \(training goes on", text))


def _store(url: str, s3) -> Store:
    """The run's store as seen from here, straight to moto (no faults in the judging)."""
    os.environ.update(s3.env(s3._up()))
    return Store(url)
