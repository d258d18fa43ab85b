"""Loop overhead: steps/s of `stockpot run` (no saves) against a hand-written bare loop
(bench/bare_loop.py) of the same model, data, optimizer and schedule, on the demo and on the
CharLM bench model; 2 ranks, DDP. Both rates are taken over the same steps (log_every to the end).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.common import Row, Sizes, median, ranks, ratio_row, run_cli

# name, config, overrides, goal
MODELS = [
    ("demo", "configs/demo.yaml", [], 1.03),
    ("CharLM", "bench/charlm.yaml", ["task.d_model=256", "task.n_layers=4"], 1.01),
]


def _stockpot_rate(config: str, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_cli(["run", config, f"run.dir={tmp}", *overrides, "checkpoint.every_steps=null"])
        lines = [json.loads(x) for x in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in lines if "loss" in x]
    first, last = timed[0], timed[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def _bare_rate(config: str, overrides: list[str]) -> float:
    return float(ranks("bench.bare_loop", [config, *overrides])[0]["steps_per_s"])


def measure(sizes: Sizes) -> list[Row]:
    rows = []
    for name, config, extra, goal in MODELS:
        # CharLM steps are ~50x the demo's: a few dozen give a steady rate
        steps = sizes.loop_steps if name == "demo" else sizes.loop_charlm_steps
        overrides = [*extra, f"trainer.max_steps={steps}", f"trainer.log_every={max(2, steps // 10)}",
                     "trainer.eval_every=null"]  # fmt: skip
        ratios, bare_rates = [], []
        for r in range(sizes.launch_repeats):
            if r % 2 == 0:
                bare, ours = _bare_rate(config, overrides), _stockpot_rate(config, overrides)
            else:
                ours, bare = _stockpot_rate(config, overrides), _bare_rate(config, overrides)
            ratios.append(bare / ours)  # step time ratio
            bare_rates.append(bare)
        rows.append(ratio_row(f"loop overhead ({name}): step time / bare loop", median(ratios),
                              f"<= {goal}", at_most=goal,
                              note=f"bare loop {median(bare_rates):.0f} steps/s"))  # fmt: skip
    return rows
