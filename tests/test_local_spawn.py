"""spawn_local with real child processes and real signals."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from launch.local import first_failure, spawn_local

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

# Every child gets its output directory as argv[1]; `out(name)` is a path in it.
PRELUDE = """
import os, signal, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
def out(name): return Path(sys.argv[1]) / name
def wait_for(name):
    while not out(name).exists(): time.sleep(0.01)
"""

REPORT = """
import json
from orchestrator.env import DistEnv
d = DistEnv.from_environ(os.environ)
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "EXTRA")
report = {k: os.environ.get(k) for k in keys} | {"source": d.source, "rank": d.rank}
out(f"rank{rank}.json").write_text(json.dumps(report))
"""

# Rank 1 fails with 3 once rank 0 is ready; rank 0 would sleep on, writing `term` on SIGTERM.
FAIL_WHILE_PEER_SLEEPS = """
if rank == 0:
    signal.signal(signal.SIGTERM, lambda *_: (out("term").touch(), sys.exit(0)))
    out("ready").touch()
    time.sleep(60)
else:
    wait_for("ready")
    sys.exit(3)
"""

# Each rank counts the signal (argv[2]) it receives, then exits 0 a moment later, so a
# duplicate delivered just after the first would be counted too.
COUNT_SIGNAL = """
signum = int(sys.argv[2])
got = []
def count(*_):
    with out(f"count.{rank}").open("a") as f: f.write("1\\n")
    got.append(1)
signal.signal(signum, count)
out(f"ready.{rank}").touch()
while not got: time.sleep(0.01)
time.sleep(0.5)
"""

# argv: child code, output dir, signal number, tty path or "".
DRIVER = """
import os, sys
if sys.argv[4]:
    os.open(sys.argv[4], os.O_RDWR)  # a session leader opening a tty makes it its terminal
from launch.local import spawn_local
child = [sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]]
sys.exit(spawn_local(child, 2, env={"PYTHONPATH": os.getcwd()}, grace_s=2))
"""


def child(code: str, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", PRELUDE + code, str(out), *args]


def wait_until(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_children_get_rank_variables(tmp_path: Path) -> None:
    code = spawn_local(child(REPORT, tmp_path), 2, env=CHILD_ENV | {"EXTRA": "x"}, grace_s=1)
    assert code == 0
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["LOCAL_RANK"] for r in reports] == ["0", "1"]
    assert all(r["source"] == "torchrun" and r["EXTRA"] == "x" for r in reports)
    assert all(r["WORLD_SIZE"] == r["LOCAL_WORLD_SIZE"] == "2" for r in reports)
    assert all(r["MASTER_ADDR"] == "127.0.0.1" for r in reports)
    assert reports[0]["MASTER_PORT"] == reports[1]["MASTER_PORT"] != "0"


def test_one_process_is_still_a_child(tmp_path: Path) -> None:
    code = "sys.exit(0 if os.getpid() != int(sys.argv[2]) else 9)"
    assert spawn_local(child(code, tmp_path, str(os.getpid())), 1, grace_s=1) == 0


def test_failure_terminates_the_others_after_grace(tmp_path: Path) -> None:
    start = time.monotonic()
    assert spawn_local(child(FAIL_WHILE_PEER_SLEEPS, tmp_path), 2, grace_s=0.5) == 3
    assert (tmp_path / "term").exists()
    assert time.monotonic() - start < 10


def test_grace_lets_the_others_finish(tmp_path: Path) -> None:
    code = """
if rank == 0:
    signal.signal(signal.SIGTERM, lambda *_: (out("term").touch(), sys.exit(0)))
    out("ready").touch()
    time.sleep(0.5)
    out("done").touch()
else:
    wait_for("ready")
    sys.exit(3)
"""
    assert spawn_local(child(code, tmp_path), 2, grace_s=10) == 3
    assert (tmp_path / "done").exists()
    assert not (tmp_path / "term").exists()


def test_sigkill_after_ignored_sigterm(tmp_path: Path) -> None:
    code = FAIL_WHILE_PEER_SLEEPS.replace(
        'lambda *_: (out("term").touch(), sys.exit(0))', "signal.SIG_IGN"
    )
    start = time.monotonic()
    assert spawn_local(child(code, tmp_path), 2, grace_s=0.3) == 3
    assert time.monotonic() - start < 10


def test_killed_child_maps_to_128_plus_signal(tmp_path: Path) -> None:
    code = "if rank == 1: os.kill(os.getpid(), signal.SIGKILL)"
    assert spawn_local(child(code, tmp_path), 2, grace_s=1) == 137


@pytest.mark.parametrize(
    ("codes", "want"),
    [
        ([None, None], None),
        ([0, None], None),
        ([1, -9], 137),  # rank 1's SIGKILL is why rank 0 lost its peer, seen in one poll
        ([-9, 1], 137),
        ([2, 1], 2),  # no signal: the lowest rank
        ([None, 3, -15, -9], 143),  # signals first, then the lowest rank among them
    ],
)
def test_first_failure_puts_a_killed_rank_before_its_peers_errors(
    codes: list[int | None], want: int | None
) -> None:
    assert first_failure(codes) == want


def test_handlers_are_restored(tmp_path: Path) -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        assert spawn_local(child("", tmp_path), 1, grace_s=1) == 0
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGUSR1, previous)


def start_driver(code: str, out: Path, signum: int, tty: str = "") -> subprocess.Popen[bytes]:
    # A new session: no controlling terminal unless `tty` gives it one, and a group of its own.
    driver = [sys.executable, "-c", DRIVER, PRELUDE + code, str(out), str(signum), tty]
    proc = subprocess.Popen(driver, cwd=REPO, start_new_session=True)
    wait_until(lambda: all((out / f"ready.{r}").exists() for r in (0, 1)))
    return proc


def counts(out: Path) -> list[int]:
    return [len((out / f"count.{r}").read_text().splitlines()) for r in (0, 1)]


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGUSR1, signal.SIGINT])
def test_signal_to_spawner_reaches_each_child_once(tmp_path: Path, signum: int) -> None:
    proc = start_driver(COUNT_SIGNAL, tmp_path, signum)
    proc.send_signal(signum)
    assert proc.wait(timeout=15) == 0
    assert counts(tmp_path) == [1, 1]


def test_sigterm_to_spawner_stops_children(tmp_path: Path) -> None:
    # Children keep the default SIGTERM action: they die of it, and so the job reports 143.
    proc = start_driver(COUNT_SIGNAL, tmp_path, signal.SIGUSR2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 128 + signal.SIGTERM


def test_terminal_ctrl_c_is_not_delivered_twice(tmp_path: Path) -> None:
    # The tty sends SIGINT to the whole foreground group, spawner and children alike; the
    # spawner must not add a second one.
    master, slave = pty.openpty()
    try:
        proc = start_driver(COUNT_SIGNAL, tmp_path, signal.SIGINT, tty=os.ttyname(slave))
        os.write(master, b"\x03")
        assert proc.wait(timeout=15) == 0
    finally:
        os.close(master)
        os.close(slave)
    assert counts(tmp_path) == [1, 1]


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nproc=0"):
        spawn_local([sys.executable, "-c", ""], 0)
    with pytest.raises(ValueError, match="argv is empty"):
        spawn_local([], 1)
