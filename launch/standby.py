"""Warm standby ranks for `stockpot run`'s in-allocation restarts (launch/supervise.py).

A cold rank spends most of a restart starting Python and importing torch and stockpot (~1.3 s
of ~2.7 s on 2 cores). While a life trains, the spawner starts the next life's ranks early
(orchestrator.standby): they import, then wait on a socket. A transient failure hands each one
its new life's environment (life id, end dir, the new MASTER_PORT...) and it runs as a fresh
rank would. They start only once every rank of the running life has trained its first step
(ending.mark_started) plus `launcher.standby_after_s`, so they never compete with a life's own
start-up, and a short run never pays for them. When the run ends any other way (finished,
stopped, deterministic, out of restarts, asked to stop) they are killed without ever having
been told a life: nothing of theirs runs. A standby that died meanwhile (a Ctrl-C reaches it
too) is replaced by a cold start at the restart.

Cost: each one holds what a rank holds after its imports (~0.3 GB resident on CPU torch 2.13,
~0.22 GB of it its own, the rest shared library pages) while the life runs, and spends the CPU
of those imports (~1.5 s) once per life.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Mapping

from orchestrator import ending

log = logging.getLogger("stockpot.supervise")
READY = b"ready\n"  # orchestrator.standby's word once imported


def fits(argv: list[str]) -> bool:
    """Whether `argv` runs a module (`python -m MODULE ...`), the only form a standby can be."""
    return len(argv) >= 3 and argv[1] == "-m"


class Standby:
    """The next life's ranks, started ahead of it. Call `expect` before each life, `tick` while
    it runs, `release` to turn a standby into a rank, and `discard` when the run ends."""

    def __init__(self, argv: list[str], nproc: int, env: Mapping[str, str], after_s: float):
        if not fits(argv):
            raise ValueError(f"a standby runs `python -m MODULE ...`, not {argv[:3]}")
        self.argv, self.nproc, self.env, self.after_s = argv, nproc, dict(env), after_s
        self.procs: list[tuple[subprocess.Popen[bytes], socket.socket]] = []
        self._end_dir = ""
        self._started_seen: float | None = None  # when every rank of the life had started
        self._born = 0.0
        self._ready: set[int] = set()

    def expect(self, end_dir: str) -> None:
        """The life about to start says it started (its ranks' first step) in `end_dir`; ""
        when no life may follow it (then none is started for it)."""
        self._end_dir, self._started_seen = end_dir, None

    def tick(self) -> None:
        """Called as the spawner polls the life: start the standbys when due; note them ready."""
        if self.procs:
            self._note_ready()
        elif self._end_dir and self._due():
            self._start()

    def release(self, envs: list[dict[str, str]]) -> list[subprocess.Popen[bytes] | None]:
        """The standbys as the ranks of the life whose environments (by rank) are `envs`; None
        for a rank that has none (not started, or it died): start that one cold."""
        got: list[subprocess.Popen[bytes] | None] = []
        for rank, env in enumerate(envs):
            got.append(self._hand_over(rank, env) if rank < len(self.procs) else None)
        self._forget()
        return got

    def _hand_over(self, rank: int, env: Mapping[str, str]) -> subprocess.Popen[bytes] | None:
        proc, control = self.procs[rank]
        with control:
            if proc.poll() is not None:
                return None
            try:
                control.sendall(json.dumps(dict(env)).encode() + b"\n")
            except OSError:  # it died between the poll and the send
                _kill(proc)
                return None
        return proc

    def discard(self) -> None:
        """Kill every standby not released (they never ran a life: nothing to save)."""
        for proc, control in self.procs:
            control.close()
            _kill(proc)
        self._forget()

    def _due(self) -> bool:
        if self._started_seen is None:
            if ending.started_ranks(self._end_dir) < self.nproc:
                return False
            self._started_seen = time.monotonic()
        return time.monotonic() - self._started_seen >= self.after_s

    def _start(self) -> None:
        module, args = self.argv[2], self.argv[3:]
        self._born = time.monotonic()
        for _ in range(self.nproc):
            ours, theirs = socket.socketpair()
            fd = theirs.fileno()
            argv = [self.argv[0], "-m", "orchestrator.standby", str(fd), module, *args]
            # Same process group as the ranks (launch/local.py): a terminal's Ctrl-C ends it.
            proc = subprocess.Popen(argv, env=self.env, pass_fds=(fd,))
            theirs.close()
            self.procs.append((proc, ours))

    def _note_ready(self) -> None:
        waiting = {r: c for r, (_, c) in enumerate(self.procs) if r not in self._ready}
        if not waiting:
            return
        readable, _, _ = select.select(list(waiting.values()), [], [], 0)
        for rank, control in waiting.items():
            if control in readable:
                self._ready.add(rank)  # "ready", or EOF: it died (a restart starts it cold)
                alive = control.recv(len(READY)) == READY
                if not alive:
                    log.warning("standby rank %d exited before it was ready", rank)
        if len(self._ready) == self.nproc:
            log.info(
                "%d standby rank(s) ready for a restart (imports done in %.1f s; ~0.3 GB of "
                "memory each while they wait; launcher.standby_after_s=null turns them off)",
                self.nproc,
                time.monotonic() - self._born,
            )

    def _forget(self) -> None:
        self.procs, self._ready, self._started_seen = [], set(), None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
