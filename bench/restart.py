"""Time to the first step after a fault: a rank of a running `stockpot run` is SIGKILLed right
after a commit; the spawner's supervisor starts every rank again and the run resumes from that
commit (an in-allocation restart, launch/supervise.py). Measured from the kill to the first
step of the new life (its metrics line), against a fresh `import torch` plus a cold raw read of
the same checkpoint, interleaved; both sides read cold (bench.disk.evict)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bench.chaos import jobs
from bench.common import PY, REPO, Row, Sizes, median, ratio_row
from bench.disk import evict, files_under
from bench.load import CONFIG, _bare_start
from orchestrator.storage import Store

COMMIT_STEP = 2


def _restart_once(run_dir: Path, sizes: Sizes, log: Path) -> tuple[float, float]:
    """(kill -> first step of the next life, kill -> the spawner's restart decision), seconds."""
    argv = [PY, "-m", "launch", "run", CONFIG, f"run.dir={run_dir}",
            f"task.d_model={sizes.d_model}", f"task.n_layers={sizes.n_layers}",
            f"trainer.max_steps={COMMIT_STEP + 3}", "trainer.batch_size=2", "trainer.log_every=1",
            f"checkpoint.every_steps={COMMIT_STEP}", "checkpoint.keep_last=1",
            "launcher.max_restarts=1"]  # fmt: skip
    with open(log, "w") as out:
        job = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while jobs.newest_step(Store(str(run_dir))) < COMMIT_STEP:
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no commit at step {COMMIT_STEP}: {log.read_text()[-2000:]}")
            time.sleep(0.01)
        ranks = jobs.ranks_of(job)
        os.kill(ranks[-1], signal.SIGSTOP)  # hold it while the files are evicted
        evict(files_under(run_dir / "checkpoints"))
        killed_at = time.time()
        os.kill(ranks[-1], signal.SIGKILL)
        if job.wait(timeout=600) != 0:
            raise RuntimeError(f"the restarted run failed: {log.read_text()[-2000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    last_resume = max(i for i, x in enumerate(lines) if x.get("event") == "resumed")
    first_step = next(x["time"] for x in lines[last_resume:] if "loss" in x)
    decided = _log_time(log.read_text(), "transient failure after")
    return first_step - killed_at, decided - killed_at


def _log_time(text: str, pattern: str) -> float:
    import datetime

    for line in text.splitlines():
        if pattern in line:
            stamp = " ".join(line.split()[:2])
            return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"no log line with {pattern!r}")


def restart_rows(sizes: Sizes, work: Path) -> list[Row]:
    ratios, restarts, bares, detects = [], [], [], []
    for r in range(sizes.launch_repeats):
        run_dir, log = work / f"restart-{r}", work / f"restart-{r}.log"
        # The baseline reads (cold, evicted first) the checkpoint the restart resumed from, so it
        # runs right after the restart in every repeat.
        (s, d), b = _restart_once(run_dir, sizes, log), _bare_start(run_dir)
        ratios.append(s / b)
        restarts.append(s)
        bares.append(b)
        detects.append(d)
    return [ratio_row("in-allocation restart: rank SIGKILLed -> first step / (import torch + raw read)",
                      median(ratios), "<= 1.5", at_most=1.5,
                      note=f"{median(restarts):.1f} s vs {median(bares):.1f} s; kill -> restart "
                           f"decided {median(detects):.2f} s")]  # fmt: skip
