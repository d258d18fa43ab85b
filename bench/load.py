"""Loading against the disk: `Checkpointer.restore()` vs a raw sequential read of the same
checkpoint's files, and the time from `stockpot run` to the first step of a resumed run vs a
bare `import torch` plus that raw read. Reads are cold on both sides (bench.disk.evict).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench.common import PY, REPO, Row, Sizes, median, ranks, ratio_row, run_cli
from bench.disk import evict, files_under, raw_read

CONFIG = "bench/charlm.yaml"


def _stockpot_args(run_dir: Path, sizes: Sizes, max_steps: int) -> list[str]:
    return ["run", CONFIG, f"run.dir={run_dir}", f"task.d_model={sizes.d_model}",
            f"task.n_layers={sizes.n_layers}", f"trainer.max_steps={max_steps}",
            "trainer.batch_size=2", "trainer.log_every=1", "checkpoint.every_steps=1000000",
            "checkpoint.keep_last=1"]  # fmt: skip


def _first_step_time(run_dir: Path, step: int) -> float:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return float([x for x in lines if x["step"] == step and "loss" in x][-1]["time"])


def _bare_start(run_dir: Path) -> float:
    """A bare `import torch` in a fresh interpreter, then a raw read of the checkpoint."""
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", "import torch"], check=True, cwd=REPO)
    took = time.perf_counter() - t0
    files = files_under(run_dir / "checkpoints")
    evict(files)
    return took + raw_read(files)


def _resume(run_dir: Path, sizes: Sizes, step: int) -> float:
    evict(files_under(run_dir / "checkpoints"))
    t0 = time.time()  # metrics lines carry wall-clock time
    run_cli(_stockpot_args(run_dir, sizes, step + 1))
    return _first_step_time(run_dir, step + 1) - t0


def resume_rows(sizes: Sizes, work: Path) -> list[Row]:
    run_dir = work / "resume"
    run_cli(_stockpot_args(run_dir, sizes, 1))  # the checkpoint at step 1 (saved at the end)
    ratios, resumed, bare = [], [], []
    for r in range(sizes.launch_repeats):
        step = 1 + r  # each resume trains one step and saves it (keep_last=1)
        if r % 2 == 0:
            b, s = _bare_start(run_dir), _resume(run_dir, sizes, step)
        else:
            s, b = _resume(run_dir, sizes, step), _bare_start(run_dir)
        ratios.append(s / b)
        resumed.append(s)
        bare.append(b)
    return [ratio_row("stockpot run to first resumed step / (import torch + raw read)",
                      median(ratios), "<= 1.5", at_most=1.5,
                      note=f"{median(resumed):.1f} s vs {median(bare):.1f} s")]  # fmt: skip


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
