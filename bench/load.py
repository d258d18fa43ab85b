"""Loading against the disk: `Checkpointer.restore()` vs a raw sequential read of the same
checkpoint's files, and the time from `stockpot run` to the first step of a resumed run vs a
bare `import torch` plus that raw read. Reads are cold on both sides (bench.disk.evict).

The resume's time is split as the leader's `startup` line in metrics.jsonl has it
(metrics.StartupClock): launch (`stockpot run` until the rank's process starts), then the
rank's phases, the median of each.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import PY, REPO, Row, Sizes, median, ranks, ratio_row, run_cli
from bench.disk import evict, files_under, raw_read

CONFIG = "bench/charlm.yaml"


def _stockpot_args(run_dir: Path, sizes: Sizes, max_steps: int) -> list[str]:
    return ["run", CONFIG, f"run.dir={run_dir}", f"task.d_model={sizes.d_model}",
            f"task.n_layers={sizes.n_layers}", f"trainer.max_steps={max_steps}",
            "trainer.batch_size=2", "trainer.log_every=1", "checkpoint.every_steps=1000000",
            "checkpoint.keep_last=1"]  # fmt: skip


# The `startup` line's phases (orchestrator/session.py marks them), in order.
PHASES = ("imports", "rendezvous", "build", "restore", "logs", "first_step")


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def _first_step_time(lines: list[dict[str, Any]], step: int) -> float:
    return float([x for x in lines if x["step"] == step and "loss" in x][-1]["time"])


def _split(lines: list[dict[str, Any]], step: int, t0: float) -> dict[str, float]:
    """Seconds per phase of the start that trained `step` first: launch, then the leader's."""
    (line,) = [x for x in lines if x["step"] == step and x.get("event") == "startup"]
    phases = {p: float(line[f"startup/{p}_s"]) for p in PHASES}
    started = float(line["time"]) - float(line["startup/total_s"])  # the rank's process
    return {"launch": started - t0, **phases}


def _bare_start(run_dir: Path) -> float:
    """A bare `import torch` in a fresh interpreter, then a raw read of the checkpoint."""
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", "import torch"], check=True, cwd=REPO)
    took = time.perf_counter() - t0
    files = files_under(run_dir / "checkpoints")
    evict(files)
    return took + raw_read(files)


def _resume(run_dir: Path, sizes: Sizes, step: int) -> tuple[float, dict[str, float]]:
    """Seconds from `stockpot run` to the resumed first step, and their split."""
    evict(files_under(run_dir / "checkpoints"))
    t0 = time.time()  # metrics lines carry wall-clock time
    run_cli(_stockpot_args(run_dir, sizes, step + 1))
    lines = _lines(run_dir)
    return _first_step_time(lines, step + 1) - t0, _split(lines, step + 1, t0)


def resume_rows(sizes: Sizes, work: Path) -> list[Row]:
    run_dir = work / "resume"
    run_cli(_stockpot_args(run_dir, sizes, 1))  # the checkpoint at step 1 (saved at the end)
    ratios, resumed, bare, splits = [], [], [], []
    for r in range(sizes.launch_repeats):
        step = 1 + r  # each resume trains one step and saves it (keep_last=1)
        if r % 2 == 0:
            b, (s, split) = _bare_start(run_dir), _resume(run_dir, sizes, step)
        else:
            (s, split), b = _resume(run_dir, sizes, step), _bare_start(run_dir)
        ratios.append(s / b)
        resumed.append(s)
        bare.append(b)
        splits.append(split)
    parts = {p: median([x[p] for x in splits]) for p in splits[0]}
    text = ", ".join(f"{p.replace('_', ' ')} {v:.2f}" for p, v in parts.items())
    return [ratio_row("stockpot run to first resumed step / (import torch + raw read)",
                      median(ratios), "<= 1.5", at_most=1.5,
                      note=f"{median(resumed):.1f} s vs {median(bare):.1f} s"),
            Row("resume start-up split (s, median; the leader's `startup` line)",
                text, "report", None, note="launch: `stockpot run` until the rank's process "
                "starts; then imports, process group, model+optimizer, checkpoint read, "
                "config+TensorBoard, first step")]  # fmt: skip


def measure(sizes: Sizes, work: Path) -> list[Row]:
    args = {"d_model": sizes.d_model, "n_layers": sizes.n_layers, "repeats": sizes.repeats,
            "work": str(work)}  # fmt: skip
    lines = ranks("bench.worker", ["load", json.dumps(args)])
    raw = [x["s"] for x in lines if x["variant"] == "raw"]
    restore = [x["s"] for x in lines if x["variant"] == "restore"]
    size = lines[0]["bytes"]
    value = median([a / b for a, b in zip(raw, restore, strict=True)])
    note = (f"{size / 1e6:.0f} MB cold: restore {size / median(restore) / 1e9:.2f} GB/s, "
            f"raw read {size / median(raw) / 1e9:.2f} GB/s")  # fmt: skip
    rows = [ratio_row("load (restore) throughput / raw sequential read", value, ">= 0.9",
                      at_least=0.9, note=note)]  # fmt: skip
    return rows + resume_rows(sizes, work)
