"""A rank for tests/test_standby.py: `python -m tests.standby_probe CODES [WAIT]`, as the local
spawner runs `orchestrator.worker`. Standbys record their pid when imported (`warm_up`); a rank
records its pid and the life's environment, says it started, in the lives WAIT lists (comma-
separated) waits until the next life's standbys are imported, and leaves with this life's code
(CODES: one per life, comma-separated; 0 says `finished` to the supervisor)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from orchestrator import ending

OUT_VAR = "STANDBY_PROBE_DIR"
KEYS = ("RANK", "MASTER_PORT", ending.LIFE_ID_VAR, ending.END_DIR_VAR)


def warm_up() -> None:
    (Path(os.environ[OUT_VAR]) / f"warm-{os.getpid()}").touch()


def _warm(out: Path) -> int:
    return len(list(out.glob("warm-*")))


def main(codes: list[int], wait: list[int]) -> int:
    out, rank = Path(os.environ[OUT_VAR]), int(os.environ["RANK"])
    life = int(os.environ[ending.LIFE_ID_VAR].rsplit("-", 1)[1])
    report = {k: os.environ.get(k) for k in KEYS} | {"pid": os.getpid()}
    (out / f"life-{life}-rank-{rank}.json").write_text(json.dumps(report))
    ending.mark_started(os.environ, rank)
    nproc, deadline = int(os.environ["WORLD_SIZE"]), time.monotonic() + 30
    while life in wait and _warm(out) < nproc * (life + 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    if codes[life] == 0:
        end = ending.make_end(os.environ[ending.LIFE_ID_VAR], rank, ending.FINISHED, "finished")
        ending.record(None, os.environ, end)
    return codes[life]


if __name__ == "__main__":
    codes, wait = ([int(c) for c in arg.split(",") if c] for arg in [*sys.argv[1:], ""][:2])
    sys.exit(main(codes, wait))
