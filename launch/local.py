"""`stockpot run`'s local spawner: N worker processes on this machine, like `torchrun --standalone`.

Each child gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and
MASTER_PORT (a free port picked here), so `DistEnv.from_environ` reads it as torchrun-style.
Whether ranks exist already (so `stockpot run` trains in-process instead of spawning) is
`orchestrator.env.in_managed_job`.
When one child fails the others get `grace_s` to finish on their own, then SIGTERM, then
SIGKILL after another `grace_s` (what torchrun does); a child stopped by SIGSTOP (hung) gets
the SIGKILL at once.

Signals: SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 sent to the spawner are forwarded to every child,
with handlers installed only while the children run. A handler only records the signal; the
wait loop forwards it (within POLL_S), so no forwarding races the start of the children.

Children stay in the spawner's process group, so a terminal's Ctrl-C reaches them directly, as
it would without the spawner. The tty then delivers SIGINT to the spawner too; forwarding it
would give every child a second SIGINT, and a second KeyboardInterrupt can break a worker's
clean-up. So SIGINT is not forwarded while the spawner is the terminal's foreground process
group (the tty has already delivered it); a `kill -INT <spawner>` in that state reaches only
the spawner: use SIGTERM for that. Other signals come from `kill`/Slurm, aimed at one process,
and are always forwarded; someone signalling the whole group (`kill -- -PGID`, or Slurm
signalling every process of a batch step) delivers twice, which stockpot's workers tolerate
because their handlers only set a flag.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launch.standby import Standby

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# How often the wait loop checks children and forwards signals.
POLL_S = 0.05
MASTER_ADDR = "127.0.0.1"


def free_port(host: str = MASTER_ADDR) -> int:
    """A TCP port free right now (rank 0 binds it a moment later; torchrun takes the same risk)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def rank_environ(base: Mapping[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of local rank `rank` of `nproc`; the rank variables win over `base`."""
    return {
        **base,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": str(port),
    }


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def spawn_local(
    argv: list[str], nproc: int, *, env: Mapping[str, str] | None = None, grace_s: float = 10.0
) -> int:
    """Run `argv` as `nproc` ranks on this machine; wait; return the job's exit code.

    0 if every child exits 0; otherwise the code of the first child to fail (`first_failure`
    on a tie): the others usually fail because of it (a lost peer, or our SIGTERM), so theirs
    would hide the cause. nproc=1 still runs a child, so signals behave the same at every size.
    """
    return run_life(argv, nproc, env=env, grace_s=grace_s).code


@dataclass(frozen=True)
class Life:
    """How one start of the ranks ended: the job's exit code, each rank's return code (as
    Popen gives it: -N for a signal), and the signals forwarded to them meanwhile."""

    code: int
    returncodes: tuple[int, ...]
    forwarded: tuple[int, ...] = ()
    killed_by_us: frozenset[int] = frozenset()  # ranks we ended after another one failed


def run_life(
    argv: list[str],
    nproc: int,
    *,
    env: Mapping[str, str] | None = None,
    grace_s: float = 10.0,
    standby: Standby | None = None,
) -> Life:
    """`spawn_local`, with the detail a supervisor needs to decide what comes next. With a
    `standby` (launch/standby.py) its waiting processes become this life's ranks (cold starts
    for any it lacks), and it may start the next life's while this one runs."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    if not argv:
        raise ValueError("argv is empty: nothing to run")
    if grace_s < 0:
        raise ValueError(f"grace_s={grace_s} must be >= 0")
    base = {**os.environ, **(env or {})}
    port = free_port()
    children = _Children()
    with _recording_signals(children.pending):
        try:
            envs = [rank_environ(base, rank, nproc, port) for rank in range(nproc)]
            warm = standby.release(envs) if standby is not None else [None] * nproc
            for rank_env, proc in zip(envs, warm, strict=True):
                children.start(argv, rank_env, proc)
            code = children.wait(grace_s, standby.tick if standby is not None else None)
        finally:
            children.kill_running()
    returncodes = tuple(p.returncode for p in children.procs)
    return Life(code, returncodes, tuple(children.forwarded), frozenset(children.killed))


def first_failure(codes: list[int | None]) -> int | None:
    """The job's exit code from the ranks' return codes seen failed in one poll (None: none
    failed yet). A rank killed by a signal comes first: a SIGKILL (the OOM killer, a kill -9)
    gives its peers no chance to say anything but "lost a peer" (exit 1) a moment later, often
    within the same poll. Then the lowest rank."""
    failed = [c for c in codes if c is not None and c != 0]
    if not failed:
        return None
    return exit_code(min(failed, key=lambda c: c >= 0))  # stable: the lowest rank of a kind


class _Children:
    """The spawned ranks, and the signals waiting to be forwarded to them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pending: list[int] = []
        self.forwarded: list[int] = []
        self.killed: set[int] = set()

    def start(
        self, argv: list[str], env: Mapping[str, str], warm: subprocess.Popen[bytes] | None
    ) -> None:
        # Same process group as the spawner (no start_new_session): see the module docstring.
        self.procs.append(warm or subprocess.Popen(argv, env=env))

    def wait(self, grace_s: float, on_poll: Callable[[], None] | None = None) -> int:
        failure: int | None = None
        escalations = iter((signal.SIGTERM, signal.SIGKILL))
        deadline = float("inf")
        while True:
            self.forward_pending()
            if on_poll is not None:
                on_poll()
            codes = [p.poll() for p in self.procs]
            if failure is None:
                failure = first_failure(codes)
                if failure is not None:
                    deadline = time.monotonic() + grace_s
            if all(c is not None for c in codes):
                return failure or 0
            if failure is not None:
                self.kill_stopped(codes)
            if time.monotonic() >= deadline:
                sig = next(escalations, None) or signal.SIGKILL
                self.killed |= {r for r, c in enumerate(codes) if c is None}
                self.send(sig)
                deadline = time.monotonic() + grace_s
            time.sleep(POLL_S)

    def kill_stopped(self, codes: list[int | None]) -> None:
        """After a failure, a rank stopped by SIGSTOP (a hung one) can take no signal but
        SIGKILL: no grace for it."""
        for rank, (proc, code) in enumerate(zip(self.procs, codes, strict=True)):
            if code is None and _stopped(proc.pid):
                self.killed.add(rank)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    def forward_pending(self) -> None:
        while self.pending:
            sig = self.pending.pop(0)
            self.forwarded.append(sig)
            if sig == signal.SIGINT and _terminal_sent_to_group():
                continue
            self.send(sig)

    def send(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def kill_running(self) -> None:
        """Leave no child behind (the normal path has none left; an exception may)."""
        self.send(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc; False where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _terminal_sent_to_group() -> bool:
    """Whether a SIGINT here most likely came from our terminal, to our whole process group."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no controlling terminal: the SIGINT was aimed at us alone
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def _recording_signals(pending: list[int]) -> Iterator[None]:
    """Append each FORWARDED signal to `pending` while inside; restore the old handlers after."""

    def record(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: the old handler was not set from Python; the default is the best guess.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
