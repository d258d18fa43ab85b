"""Saving against the disk: sync save vs a raw write, `torch.save` and plain `dcp.save`; async
save's stall, its background write speed and what it does to step time.

The rank side (`sync_phase`, `async_phase`) runs inside bench.worker; `measure` launches it and
turns the medians into rows. Every variant writes the same state: a CharLM with AdamW, 2 ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import Row, Sizes, median, ranks, ratio_row


def _gbps(nbytes_: int, seconds: float) -> str:
    return f"{nbytes_ / seconds / 1e9:.2f} GB/s"


def measure(sizes: Sizes, work: Path, details: dict[str, Any]) -> list[Row]:
    args = {"d_model": sizes.d_model, "n_layers": sizes.n_layers, "repeats": sizes.repeats,
            "work": str(work)}  # fmt: skip
    lines = ranks("bench.worker", ["save,async", json.dumps(args)])  # one start for both
    sync = [line for line in lines if "variant" in line]
    by: dict[str, list[float]] = {}
    for line in sync:
        by.setdefault(line["variant"], []).append(line["s"])
    size = sync[0]["bytes"]
    per = list(zip(by["raw"], by["stockpot"], by["torch.save"], by["dcp.save"], strict=True))
    mb = f"{size / 1e6:.0f} MB"
    rows = [
        ratio_row("sync save throughput (2 ranks) / raw write+fsync", median([a / s for a, s, _, _ in per]),
                  ">= 0.9", at_least=0.9,
                  note=f"{mb}: stockpot {_gbps(size, median(by['stockpot']))}, raw {_gbps(size, median(by['raw']))}"),
        ratio_row("sync save speed / torch.save+fsync (x faster)", median([t / s for _, s, t, _ in per]),
                  "> 1", at_least=1.0 + 1e-9, note=f"torch.save {_gbps(size, median(by['torch.save']))}"),
        ratio_row("sync save speed / plain dcp.save (x faster)", median([d / s for _, s, _, d in per]),
                  "> 1", at_least=1.0 + 1e-9, note=f"dcp.save {_gbps(size, median(by['dcp.save']))}"),
    ]  # fmt: skip
    med = {name: median(values) for name, values in by.items()}
    details["save"] = {"mb": size / 1e6, "raw_s": med["raw"], "stockpot_s": med["stockpot"],
                       "raw_gbps": size / med["raw"] / 1e9, "stockpot_gbps": size / med["stockpot"] / 1e9,
                       "torch_gbps": size / med["torch.save"] / 1e9, "dcp_gbps": size / med["dcp.save"] / 1e9}  # fmt: skip
    background = [line for line in lines if "stall_s" in line]
    return rows + _async_rows(background, mb, details["save"])


def _async_rows(lines: list[dict[str, Any]], mb: str, details: dict[str, Any]) -> list[Row]:
    size = lines[0]["bytes"]
    details["stall_s"] = median([x["stall_s"] for x in lines])
    details["background_gbps"] = size / median([x["background_s"] for x in lines]) / 1e9
    stall = median([x["stall_s"] / x["raw_s"] for x in lines])
    steps = [x["during_step_s"] / x["base_step_s"] for x in lines if x["during_step_s"]]
    background = median([x["raw_s"] / x["background_s"] for x in lines])
    return [
        ratio_row("async save: training stall / raw write time", stall, "<= 0.02 at ~1 GB",
                  at_most=0.02, note=f"{mb}: stall {median([x['stall_s'] for x in lines]):.3f} s"),
        ratio_row("step time during a background save / with none",
                  median(steps) if steps else float("nan"), "<= 1.10", at_most=1.10,
                  note=f"step {median([x['base_step_s'] for x in lines]):.2f} s; "
                  f"{median([x['steps_during'] for x in lines]):.0f} steps during a save"),
        ratio_row("background write throughput / raw write", background, ">= 0.9", at_least=0.9,
                  note=f"background {_gbps(size, median([x['background_s'] for x in lines]))}"),
    ]  # fmt: skip
