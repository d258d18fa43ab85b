"""Start real ranks as real processes (gloo over TCP on 127.0.0.1), like torchrun --standalone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from launch.local import free_port

REPO = Path(__file__).resolve().parents[1]


def start_ranks(
    module: str,
    args: Sequence[str],
    nproc: int,
    *,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
) -> list[subprocess.Popen[bytes]]:
    port = free_port()
    procs = []
    for rank in range(nproc):
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        out = open(log_dir / f"rank{rank}.log", "ab") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=rank_env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def wait_ranks(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 180.0) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            kill_all(procs)
            raise
    return codes


def kill_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def run_ranks(
    module: str,
    args: Sequence[str],
    nproc: int,
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
) -> None:
    """Run to completion; fail with the rank logs if any rank exits non-zero."""
    codes = wait_ranks(start_ranks(module, args, nproc, env=env, log_dir=log_dir), timeout)
    if any(codes):
        logs = "\n".join(
            f"--- rank{r}\n" + (log_dir / f"rank{r}.log").read_text()[-3000:] for r in range(nproc)
        )
        raise AssertionError(f"ranks exited {codes}\n{logs}")
