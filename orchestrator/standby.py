"""A rank process started before its life: `python -m orchestrator.standby FD MODULE ARGS...`.

The local spawner (launch/standby.py) starts one per rank while a life trains. It imports what
MODULE's ranks import (MODULE's `warm_up()`, if it has one), says `ready` on the socket FD, and
waits there. If a transient failure ends the life, the spawner sends the new life's whole
environment as one JSON line and the process becomes that life's rank: `python -m MODULE ARGS`
as a fresh interpreter would run it, without the interpreter's start and the imports. EOF
instead (the run ended, or the spawner died): it leaves without a word.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import time

from orchestrator.metrics import HANDED_OVER_VAR

# Until it is a rank a standby belongs to no life: a signal (a terminal's Ctrl-C reaches the
# whole process group) ends it quietly, without a traceback, and the spawner starts a cold
# rank in its place. The rank's own handlers (orchestrator.preemption) come with MODULE.
QUIET = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
READY = b"ready\n"
# Its name in ps/top (/proc/PID/comm, at most 15 bytes) until it becomes a rank: tools that
# look for a job's ranks among the spawner's children (bench/chaos) leave standbys out.
COMM = "stockpot-spare"


def main(argv: list[str]) -> None:
    fd, module, *args = argv
    for sig in QUIET:
        signal.signal(sig, signal.SIG_DFL)
    own_name = _rename(COMM)
    with socket.socket(fileno=int(fd)) as control:
        warm_up(module)
        with contextlib.suppress(OSError):  # handed over while importing: nobody listens now
            control.sendall(READY)
        with control.makefile("rb") as reader:
            message = reader.readline()
    if not message:
        os._exit(0)  # discarded: nothing was started, nothing to clean up
    _rename(own_name)
    os.environ.clear()
    os.environ.update(json.loads(message))
    os.environ[HANDED_OVER_VAR] = repr(time.time())  # where this rank's start-up begins
    sys.argv = [module, *args]
    # Run as `python -m` would: a fresh __main__ (warm_up imported it under its own name).
    sys.modules.pop(module, None)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _rename(name: str) -> str:
    """Set this process's name (comm); the name it had ("" where /proc cannot say)."""
    try:
        with open("/proc/self/comm", "r+") as f:
            before = f.read().strip()
            f.seek(0)
            f.write(name)
        return before
    except OSError:
        return ""


def warm_up(module: str) -> None:
    """Import MODULE and what its `warm_up()` imports. Then move everything imported out of the
    cyclic garbage collector's reach, as the built-in loop does after its build (loop.py
    `_freeze_what_is_built`): that loop's own full collection then walks only what the rank
    built, not the ~0.1 s of torch's modules. An import that fails here fails again in the
    rank, which says why: the standby leaves quietly and the spawner starts a cold rank."""
    try:
        warm = getattr(importlib.import_module(module), "warm_up", None)
        if warm is not None:
            warm()
    except Exception:
        os._exit(1)
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    main(sys.argv[1:])
