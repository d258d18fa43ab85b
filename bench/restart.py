"""Time to the first step after a fault: a rank of a running `stockpot run` is SIGKILLed right
after a commit; the spawner's supervisor starts every rank again and the run resumes from that
commit (an in-allocation restart, launch/supervise.py). Measured from the kill to the first
step of the new life (its metrics line), against a fresh `import torch` plus a cold raw read of
the same checkpoint, interleaved; both sides read cold (bench.disk.evict).

Two restarts per repeat: warm, with the spawner's standby ranks imported and waiting
(launch/standby.py; the kill comes at the first commit after they are ready, as for a fault
later than `launcher.standby_after_s` into a life), and cold, without standbys (a fault early
in a life, or `launcher.standby_after_s=null`), killed at the first commit."""

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

EVERY = 2  # checkpoint.every_steps
READY = "standby rank(s) ready for a restart"  # launch/standby.py's line
TIMEOUT_S = 600


def _restart_once(run_dir: Path, sizes: Sizes, log: Path, warm: bool) -> tuple[float, float]:
    """(kill -> first step of the next life, kill -> the spawner's restart decision), seconds."""
    argv = [PY, "-m", "launch", "run", CONFIG, f"run.dir={run_dir}",
            f"task.d_model={sizes.d_model}", f"task.n_layers={sizes.n_layers}",
            "trainer.max_steps=1000", "trainer.batch_size=2", "trainer.log_every=1",
            f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=1",
            "launcher.max_restarts=1", f"launcher.standby_after_s={0 if warm else 'null'}"]  # fmt: skip
    with open(log, "w") as out:
        job = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT_S
        if warm:
            _wait(job, log, deadline, lambda: READY in log.read_text())
        after = jobs.newest_step(Store(str(run_dir)))
        _wait(job, log, deadline, lambda: jobs.newest_step(Store(str(run_dir))) > after)
        ranks = jobs.ranks_of(job)
        for pid in ranks:  # hold them while the files are evicted (a save may be under way)
            os.kill(pid, signal.SIGSTOP)
        _wait(job, log, deadline, lambda: all(_stopped(pid) for pid in ranks))
        evict(files_under(run_dir / "checkpoints"))
        killed_at = time.time()
        os.kill(ranks[-1], signal.SIGKILL)
        for pid in ranks[:-1]:
            os.kill(pid, signal.SIGCONT)
        _wait(job, log, deadline, lambda: _first_step_after_resume(run_dir) is not None)
        job.send_signal(signal.SIGTERM)  # measured: stop the run (saves, exits 75)
        if job.wait(timeout=TIMEOUT_S) not in (0, 75):
            raise RuntimeError(f"the restarted run failed: {log.read_text()[-2000:]}")
    first_step = _first_step_after_resume(run_dir)
    assert first_step is not None
    decided = _log_time(log.read_text(), "transient failure after")
    return first_step - killed_at, decided - killed_at


def _wait(job: subprocess.Popen[bytes], log: Path, deadline: float, done) -> None:  # type: ignore[no-untyped-def]
    while not done():
        if job.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run ended or stalled: {log.read_text()[-2000:]}")
        time.sleep(0.01)


def _stopped(pid: int) -> bool:
    """SIGSTOP takes effect a moment after kill() returns: state T in /proc once it has."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] in ("T", "t")


def _first_step_after_resume(run_dir: Path) -> float | None:
    text = (run_dir / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.endswith("}")]
    resumed = [i for i, x in enumerate(lines) if x.get("event") == "resumed"]
    if not resumed:
        return None
    return next((x["time"] for x in lines[resumed[-1] :] if "loss" in x), None)


def _log_time(text: str, pattern: str) -> float:
    import datetime

    for line in text.splitlines():
        if pattern in line:
            stamp = " ".join(line.split()[:2])
            return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"no log line with {pattern!r}")


def restart_rows(sizes: Sizes, work: Path) -> list[Row]:
    got: dict[bool, dict[str, list[float]]] = {w: {"r": [], "s": [], "b": [], "d": []}
                                               for w in (True, False)}  # fmt: skip
    for r in range(sizes.launch_repeats):
        for warm in (True, False) if r % 2 == 0 else (False, True):
            name = f"restart-{'warm' if warm else 'cold'}-{r}"
            run_dir, log = work / name, work / f"{name}.log"
            # The baseline reads (cold, evicted first) the checkpoint the restart resumed from,
            # so it runs right after the restart in every repeat.
            (s, d), b = _restart_once(run_dir, sizes, log, warm), _bare_start(run_dir)
            for key, value in zip("rsbd", (s / b, s, b, d), strict=True):
                got[warm][key].append(value)
    rows = []
    for warm, what in ((True, "standby ranks ready"), (False, "cold, no standby")):
        m = {k: median(v) for k, v in got[warm].items()}
        rows.append(ratio_row(f"in-allocation restart ({what}): rank SIGKILLed -> first step / "
                              "(import torch + raw read)", m["r"], "<= 1.5", at_most=1.5,
                              note=f"{m['s']:.1f} s vs {m['b']:.1f} s; kill -> restart decided "
                                   f"{m['d']:.2f} s"))  # fmt: skip
    return rows
