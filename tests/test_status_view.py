"""`stockpot status RUN` (the human view) and `--watch`, on a real run stopped by a signal and
resumed; the speed/ETA/cause rules on their own."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from launch.status_view import CLEAR, progress_report, render, restart_causes
from tests import runs
from tests.runs import REPO, STOCKPOT

ARGS = [
    "configs/demo.yaml", "trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=10",
    "checkpoint.every_steps=5", *runs.SMALL_DATA,
    # No warm standby among the children the stop test freezes and signals (a slow box can
    # outlive standby_after_s before step 10; a standby never takes USR2 as a rank does).
    "launcher.standby_after_s=null",
]  # fmt: skip


def status(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STOCKPOT, "status", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_status_of_a_stopped_then_resumed_run(tmp_path: Path) -> None:
    """The first life may train far (3000 steps: a fast machine cannot finish before the signal
    lands; CI once saw 30 steps end first); it stops where the signal lands, and the resumed life
    finishes 10 steps later."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    first = [*ARGS, "trainer.max_steps=3000", f"run.dir={run_dir}"]
    with open(log, "ab") as out:
        job = subprocess.Popen([STOCKPOT, "run", *first], cwd=REPO, stdout=out, stderr=out)
    runs.wait_until(lambda: runs.newest_step(run_dir) >= 10, "a commit at step 10", 240)
    ranks = runs.child_pids(job.pid)
    with runs.frozen(ranks):  # stopped where the test read it
        job.send_signal(signal.SIGUSR2)  # as Slurm does before a time limit
        runs.wait_until(lambda: all(runs.reached(p, signal.SIGUSR2) for p in ranks), "USR2")
    assert job.wait(timeout=120) == 75, log.read_text()[-2000:]
    stopped = status(str(run_dir))
    assert stopped.returncode == 0, stopped.stderr
    text = stopped.stdout
    assert "/3000 [" in text and "step/s" in text and "ETA" in text, text
    assert "resumes by cause: none" in text and "newest commit: step" in text, text

    end = runs.newest_step(run_dir) + 10
    assert 10 < end < 3000
    assert (
        runs.stockpot_run([*ARGS, f"trainer.max_steps={end}", f"run.dir={run_dir}"], log=log) == 0
    )
    done = status(str(run_dir)).stdout
    assert f"step {end}/{end} [" + "#" * 30 + "] 100%" in done and "done" in done, done
    assert "resumes by cause: 1 stopped by a signal" in done, done
    assert f"newest commit: step {end}" in done, done

    _watch_piped_prints_plain_frames(run_dir, end)
    _watch_on_a_tty_clears_the_screen(run_dir)
    _verify_shows_a_byte_bar_on_a_tty_only(run_dir)


def _ctrl_c_works() -> None:
    """In the child: SIGINT back to its default before exec, so Python turns it into
    KeyboardInterrupt. A shell runs background jobs (`make test &`, nohup) with SIGINT ignored,
    children inherit that, and Python then leaves it ignored: Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _watch_piped_prints_plain_frames(run_dir: Path, end: int) -> None:
    watch = subprocess.Popen(
        [STOCKPOT, "status", str(run_dir), "--watch", "0.3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_ctrl_c_works,
    )  # fmt: skip
    assert watch.stdout is not None
    seen = ""
    frame = f"step {end}/{end}"
    while seen.count(frame) < 2:  # redrawn once: enough to stop it
        line = watch.stdout.readline()  # each frame is flushed whole
        if not line:
            break  # it exited: the asserts below say how
        seen += line
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=30)
    out = seen + out
    assert watch.returncode == 0, err
    assert out.count(frame) >= 2, out  # redrawn
    assert "\x1b" not in out  # no escape codes when not a terminal


def _watch_on_a_tty_clears_the_screen(run_dir: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: stockpot on a terminal
        os.chdir(REPO)
        _ctrl_c_works()
        os.execv(STOCKPOT, [STOCKPOT, "status", str(run_dir), "--watch", "0.3"])
    seen = b""
    deadline = time.monotonic() + 60
    while seen.count(CLEAR.encode()) < 2 and time.monotonic() < deadline:
        try:
            seen += os.read(fd, 65536)
        except OSError:
            break
    os.kill(pid, signal.SIGINT)
    os.waitpid(pid, 0)
    os.close(fd)
    assert seen.count(CLEAR.encode()) >= 2, seen[-2000:]
    assert b"Ctrl-C to stop" in seen


def _on_a_tty(argv: list[str]) -> bytes:
    """Everything `argv` writes to a terminal, until it exits."""
    pid, fd = pty.fork()
    if pid == 0:  # a terminal of 120 columns: a fresh pty has 0, and tqdm draws to the width
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(REPO)
        os.execv(argv[0], argv)
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    return seen


def _verify_shows_a_byte_bar_on_a_tty_only(run_dir: Path) -> None:
    tty = _on_a_tty([STOCKPOT, "verify", str(run_dir)])
    assert b"verify: 100%" in tty and b"B/s" in tty, tty[-2000:]
    piped = subprocess.run(
        [STOCKPOT, "verify", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert piped.returncode == 0 and "verify:" not in piped.stderr, piped.stderr


def _line(step: int, t: float, **extra: object) -> dict[str, object]:
    return {"step": step, "time": t, **extra}


def test_speed_and_eta_come_from_the_current_life() -> None:
    records = [_line(s, 100.0 + s, loss=1.0) for s in range(1, 11)]  # 1 step/s
    records.append(_line(5, 500.0, event="resumed", resumes=1))
    records += [_line(s, 500.0 + (s - 5) / 4, loss=1.0) for s in range(6, 14)]  # 4 step/s
    p = progress_report(records, {"trainer": {"max_steps": 33}}, now=510.0)
    assert p["step"] == 13 and p["max_steps"] == 33
    assert abs(p["steps_per_s"] - 4.0) < 1e-9 and abs(p["eta_s"] - 5.0) < 1e-9
    assert p["restarts"] == {"crash": 1}


def test_a_stop_near_the_time_limit_is_a_time_out_else_a_preemption() -> None:
    slurm = {"kind": "slurm", "timeout_min": 60}  # time-outs from 48 min on (submitit's rule)
    records = [
        _line(10, 1.0, event="stopped", signal="SIGUSR2", uptime_s=50 * 60),
        _line(10, 2.0, event="resumed", resumes=1),
        _line(20, 3.0, event="stopped", signal="SIGUSR2", uptime_s=5 * 60),
        _line(20, 4.0, event="resumed", resumes=2),
        _line(25, 5.0, event="resumed", resumes=3),  # no save before it: killed
    ]
    assert restart_causes(records, slurm) == {"preemption": 1, "time-out": 1, "crash": 1}
    assert restart_causes(records, {"kind": "local"}) == {"signal": 2, "crash": 1}


def test_tiers_show_the_newest_commit_on_each_tier_and_the_steps_at_risk() -> None:
    """From metrics.jsonl: commits of a tiered run carry steps_at_risk; `durable` events say
    which made it to run.dir. A run without tiers shows no tier line."""
    risk = "checkpoint/steps_at_risk"
    records = [_line(s, float(s), loss=1.0) for s in range(1, 41)]
    records += [_line(10, 10.5, event="commit", **{risk: 10}),
                _line(10, 10.8, event="durable", **{risk: 0}),
                _line(20, 20.5, event="commit", **{risk: 10}),
                _line(30, 30.5, event="commit", **{risk: 20}),
                _line(40, 40.5, event="commit", **{risk: 30})]  # fmt: skip
    p = progress_report(records, {"trainer": {"max_steps": 40}}, now=41.0)
    assert p["tiers"] == {
        "newest_local": 40, "newest_durable": 10, "steps_at_risk": 30, "local_only": [20, 30, 40]
    }  # fmt: skip
    text = render("TABLE", {"progress": p, "checkpoints": [], "leftovers": []}, now=41.0)
    assert "newest commit on the nodes step 40, newest durable step 10; steps at risk 30" in text
    assert "on the nodes only (not durable yet): step 20, 30, 40" in text
    plain = [r for r in records if r.get("event") != "durable" and risk not in r]
    plain.append(_line(40, 40.5, event="commit"))
    p = progress_report(plain, {"trainer": {"max_steps": 40}}, now=41.0)
    assert p["tiers"] is None
    assert "tiers:" not in render(
        "TABLE", {"progress": p, "checkpoints": [], "leftovers": []}, now=41.0
    )
