"""Loop overhead: steps/s of `stockpot run` (no saves) against a hand-written bare loop
(bench/bare_loop.py) of the same model, data, optimizer and schedule, on the demo and on the
CharLM bench model; 2 ranks, DDP. Both rates are taken over the same steps (log_every to the end).
And what trainer.ema costs: the same runs with one EMA against without (interleaved), and its
shadows' memory against the parameters' (the line `orchestrator/ema.py` logs).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from bench.common import Row, Sizes, median, ranks, ratio_row, run_cli

# name, config, overrides, goal
MODELS = [
    ("demo", "configs/demo.yaml", [], 1.03),
    ("CharLM", "bench/charlm.yaml", ["task.d_model=256", "task.n_layers=4"], 1.01),
]


EMA_MEMORY = re.compile(r"MB of shadows per EMA on this rank, ([\d.]+)x its parameters")


def _stockpot_run(config: str, overrides: list[str]) -> tuple[float, str]:
    """steps/s over the logged steps, and the run's log."""
    with tempfile.TemporaryDirectory() as tmp:
        log = run_cli(["run", config, f"run.dir={tmp}", *overrides, "checkpoint.every_steps=null"])
        lines = [json.loads(x) for x in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in lines if "loss" in x]
    first, last = timed[0], timed[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"]), log


def _stockpot_rate(config: str, overrides: list[str]) -> float:
    return _stockpot_run(config, overrides)[0]


def _bare_rate(config: str, overrides: list[str]) -> float:
    return float(ranks("bench.bare_loop", [config, *overrides])[0]["steps_per_s"])


def _overrides(name: str, sizes: Sizes, extra: list[str]) -> list[str]:
    # CharLM steps are ~50x the demo's: a few dozen give a steady rate
    steps = sizes.loop_steps if name == "demo" else sizes.loop_charlm_steps
    return [*extra, f"trainer.max_steps={steps}", f"trainer.log_every={max(2, steps // 10)}",
            "trainer.eval_every=null"]  # fmt: skip


def measure_ema(sizes: Sizes) -> list[Row]:
    """Step time with trainer.ema=[0.999] / without, the same runs interleaved (order rotates),
    and the EMA's shadow bytes / parameter bytes (per decay, per rank: DDP holds it whole)."""
    rows = []
    for name, config, extra, _ in MODELS:
        overrides = _overrides(name, sizes, extra)
        with_ema = [*overrides, "trainer.ema=[0.999]"]
        ratios, memory = [], []
        for r in range(sizes.launch_repeats):
            if r % 2 == 0:
                plain, (ema, log) = (
                    _stockpot_rate(config, overrides),
                    _stockpot_run(config, with_ema),
                )
            else:
                (ema, log), plain = (
                    _stockpot_run(config, with_ema),
                    _stockpot_rate(config, overrides),
                )
            ratios.append(plain / ema)  # step time ratio
            found = EMA_MEMORY.search(log)
            memory.append(float(found.group(1)) if found else float("nan"))
        rows.append(ratio_row(f"trainer.ema ({name}): step time with one EMA / without",
                              median(ratios), "<= 1.05", at_most=1.05,
                              note=f"shadows {median(memory):.2f}x the parameters' bytes per "
                              "decay (float32)"))  # fmt: skip
    return rows


def measure(sizes: Sizes) -> list[Row]:
    rows = []
    for name, config, extra, goal in MODELS:
        overrides = _overrides(name, sizes, extra)
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
    return rows + measure_ema(sizes)
