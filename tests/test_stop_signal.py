"""Polite stops: SIGTERM/SIGUSR2 to a running job makes every rank save at the next step
boundary, commit, and exit 75; running it again resumes and finishes. `make demo` does this."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.checkpoint import catalog
from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests import runs

REPO = Path(__file__).resolve().parents[1]
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
SMALL = ["task.n_train=4096", "task.n_eval=512", "trainer.log_every=1"]


def test_signal_saves_at_the_next_step_and_resume_finishes(tmp_path: Path) -> None:
    """SIGTERM stops the first life of the run, SIGUSR2 the second (which resumed from the
    first's stop); a third resumes from that and finishes."""
    run_dir = tmp_path / "run"
    args = [STOCKPOT, "run", "configs/demo.yaml", f"run.dir={run_dir}", "trainer.max_steps=400",
            "checkpoint.every_steps=1000", *SMALL]  # fmt: skip
    resumed_from = 0
    for life, sig in enumerate((signal.SIGTERM, signal.SIGUSR2)):
        log = tmp_path / f"life{life}.log"
        with open(log, "wb") as out:
            job = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while f"step {resumed_from + 5}/400" not in log.read_text():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        job.send_signal(sig)
        assert job.wait(timeout=120) == 75, log.read_text()[-2000:]
        text = log.read_text()
        assert f"stop requested ({sig.name})" in text
        assert "during start-up" not in text, "a stop while training is not the start-up path"
        if resumed_from:
            assert f"resumed from step {resumed_from}" in text
        stopped = catalog.scan(Store(str(run_dir))).latest()
        assert stopped is not None and resumed_from + 5 <= stopped.step < 400, (
            "saved where it stopped, not at a schedule"
        )
        resumed_from = stopped.step
    code = subprocess.run(
        [*args[:4], "trainer.max_steps=" + str(resumed_from + 5), *args[5:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert code.returncode == 0, code.stderr[-2000:]
    assert f"resumed from step {resumed_from}" in code.stderr
    assert runs.newest_step(run_dir) == resumed_from + 5


def test_make_demo_driver_interrupts_resumes_and_summarises(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "launch.demo", "configs/demo.yaml", f"run.dir={tmp_path / 'demo'}",
         "trainer.max_steps=100", "checkpoint.every_steps=10", "trainer.eval_every=10", *SMALL],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sending SIGUSR2 to the job" in out.stdout
    assert "the job saved and stopped (exit 75)" in out.stdout
    assert "steps trained  100 of 100" in out.stdout
    assert "restarts       1 (resumed from step" in out.stdout
    assert "held-out acc" in out.stdout
    assert "=== checkpoint soup (uniform over steps" in out.stdout
    resumed = [
        r for r in read_metrics(Store(str(tmp_path / "demo"))) if r.get("event") == "resumed"
    ]
    assert len(resumed) == 1
    status = subprocess.run(
        [STOCKPOT, "status", str(tmp_path / "demo"), "--json"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(status.stdout)
    assert (report["restarts"], report["resumes"]) == (0, 1)


def test_signal_during_start_up_is_kept_not_fatal(tmp_path: Path) -> None:
    """USR2 before training begins (torch still importing) must not kill the rank: the run
    starts, sees the stop at its first step boundary, commits step 1 and exits 75."""
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        [STOCKPOT, "run", "configs/demo.yaml", f"run.dir={run_dir}", "trainer.max_steps=50", *SMALL],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Both ranks exist and catch USR2 (orchestrator.worker's first act), and are still
        # importing torch for seconds: the signal lands in that window, not by luck of a sleep.
        runs.wait_until(
            lambda: (
                len(ranks := runs.child_pids(job.pid)) == 2
                and all(runs.catches(pid, signal.SIGUSR2) for pid in ranks)
            ),
            "both ranks to catch SIGUSR2",
        )
        job.send_signal(signal.SIGUSR2)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 75, err[-2000:]
    # Every rank took the early path (a handler that only records), not the running one.
    assert err.count("SIGUSR2 arrived during start-up, before training began") == 2, err[-2000:]
    assert "stop requested (SIGUSR2): step 1 committed" in err
    assert runs.newest_step(run_dir) == 1
