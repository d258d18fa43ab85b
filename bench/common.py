"""What every benchmark shares: result rows, medians, launching ranks, and the bench's sizes.

Every figure is a ratio against a baseline measured in the same run, on the same disk,
interleaved with it (A B A B ..., not A A A B B B), and the median of several repeats: these
machines swing 2-4x between runs, so absolute numbers mean little and ratios are what we keep.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launch.local import free_port
from orchestrator.env import cpu_threads

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Row:
    """One line of the results table. `value` is None when the figure could not be measured
    (`note` says why); `met` is None where the figure has no pass/fail goal."""

    figure: str
    value: float | str | None
    goal: str
    met: bool | None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sizes:
    """How big the bench is: quick mode fits in ~5 minutes on 2 cores, FULL=1 is ~1 GB of state."""

    d_model: int  # CharLM width for the save/load state (its AdamW state triples the bytes)
    n_layers: int
    repeats: int  # interleaved repeats per figure (the median is reported)
    launch_repeats: int  # the same for figures that start processes per repeat (loop, resume)
    s3_layers: int  # the S3 state's CharLM depth at d_model=256 (moto is slow: keep it small)
    loop_steps: int  # steps per loop-overhead run on the demo
    loop_charlm_steps: int  # the same on CharLM (~0.3 s a step on 2 cores)
    s3_resume_kept: int  # checkpoints a whole `stockpot run` resume on S3 finds
    s3_resume_worlds: tuple[int, ...]  # the rank counts it resumes at
    soup_layers: int  # the soup's CharLM depth at d_model=1024 (~48 MB of weights a layer)

    @staticmethod
    def quick() -> Sizes:
        return Sizes(d_model=512, n_layers=4, repeats=3, launch_repeats=2, s3_layers=2,
                     loop_steps=600, loop_charlm_steps=12, s3_resume_kept=10,
                     s3_resume_worlds=(2,), soup_layers=2)  # fmt: skip

    @staticmethod
    def full() -> Sizes:
        return Sizes(d_model=1024, n_layers=7, repeats=5, launch_repeats=5, s3_layers=8,
                     loop_steps=1500, loop_charlm_steps=60, s3_resume_kept=20,
                     s3_resume_worlds=(2, 4), soup_layers=5)  # fmt: skip


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ranks(
    module: str, args: Sequence[str], nproc: int = 2, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run `python -m module args` as nproc gloo ranks; the JSON lines rank 0 printed.

    A failing rank raises with the tail of its stderr, so a broken bench says why. Each rank
    gets its share of the CPUs (OMP_NUM_THREADS, as torchrun sets it; `stockpot run` does the
    same by itself, orchestrator/env.py cpu_threads), so hand-written baselines are not slowed
    by ranks fighting over cores."""
    port = str(free_port())
    threads = cpu_threads(os.environ, len(os.sched_getaffinity(0)), nproc)
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": str(nproc),
        "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"] if threads is None else str(threads),
        **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
        **(env or {}),
    }
    procs = [
        subprocess.Popen(
            [PY, "-m", module, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(nproc)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for r, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"{module} rank {r} exited {p.returncode}: {err[-2000:]}")
    return [json.loads(line) for line in outs[0][0].splitlines() if line.startswith("{")]


def run_cli(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    """`python -m launch ARGS` (what `stockpot` runs), raising with its stderr if it fails;
    its stderr (the log) if it does not."""
    done = subprocess.run(
        [PY, "-m", "launch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"stockpot {' '.join(args[:2])} exited {done.returncode}: "
                           f"{done.stderr[-2000:]}")  # fmt: skip
    return done.stderr


def ratio_row(figure: str, value: float, goal: str, at_least: float | None = None,
              at_most: float | None = None, note: str = "") -> Row:  # fmt: skip
    """A row whose goal is a bound on the ratio."""
    met = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    return Row(figure, round(value, 3), goal, met, note)
