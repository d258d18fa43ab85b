"""Tiered checkpoints (`checkpoint.local_dir`) against a slow remote S3: moto_server behind
s3.py's proxy capped at 50 MB/s, the same link for both sides of every figure.

- Save: the time a save holds training (`Checkpointer.save`, between barriers) with a local
  tier vs straight to S3, interleaved; and the steps trained while the tiered save's upload
  runs in the background, against the steps just before it.
- Restore: a fresh Checkpointer restoring the newest step with the local tier intact (read
  cold) vs with it moved away (every file from S3); an untiered restore of the same durable
  copy is in the note, so the tiered fallback's cost shows. And the bytes a restore from S3
  downloads (counted at the proxy between marks) against what the ranks' loads read.

One start of the ranks for both (bench/phases.py tiers_phase).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.common import Row, Sizes, median, ranks, ratio_row
from bench.s3 import CAP_MB_S, MARK, bucket_name, moto_server
from devtools.s3server import FAKE_ENV, FaultProxy


def _by(lines: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    return [x for x in lines if x["variant"] == variant]


def save_rows(lines: list[dict[str, Any]]) -> list[Row]:
    tiered, straight = _by(lines, "tiered"), _by(lines, "straight")
    size = tiered[0]["bytes"] / 1e6
    ratio = median([t["s"] / s["s"] for t, s in zip(tiered, straight, strict=True)])
    uploads = [x["upload_s"] for x in tiered if x["upload_s"] is not None]
    steps = [x["during_step_s"] / x["base_step_s"] for x in tiered if x["during_step_s"]]
    return [
        ratio_row(f"tiered save: training-facing time, local tier / straight to S3 ({CAP_MB_S:g} MB/s link)",
                  ratio, "<= 0.25", at_most=0.25,
                  note=f"{size:.0f} MB: local tier {median([x['s'] for x in tiered]):.2f} s, "
                  f"straight {median([x['s'] for x in straight]):.2f} s; upload in the background "
                  f"{median(uploads) if uploads else float('nan'):.2f} s (the link alone "
                  f"{size / CAP_MB_S:.2f} s)"),
        ratio_row("step time during the background upload / with none",
                  median(steps) if steps else float("nan"), "<= 1.10", at_most=1.10,
                  note=f"step {median([x['base_step_s'] for x in tiered]):.3f} s; "
                  f"{median([x['steps_during'] for x in tiered]):.0f} steps during an upload"),
    ]  # fmt: skip


def downloaded(proxy: FaultProxy) -> dict[str, int]:
    """Bytes the proxy sent down between each `NAME-start` and `NAME-end` mark (phases._mark)."""
    at: dict[str, int] = {}
    for (_method, path), down in zip(proxy.requests, proxy.down_at, strict=True):
        if f"/{MARK}/" in path:
            at[path.rsplit("/", 1)[1]] = down
    return {k.removesuffix("-end"): at[k] - at[k.replace("-end", "-start")]
            for k in at if k.endswith("-end")}  # fmt: skip


def bytes_row(lines: list[dict[str, Any]], down: dict[str, int]) -> Row:
    """A restore straight from S3 should download what the loads read, once: under DDP every
    rank reads the whole checkpoint, so the floor is its bytes times the ranks."""
    ratios = {v: median([down[f"{x['repeat']}-{v}"] / (x["bytes"] * x["world"])
                         for x in _by(lines, v)]) for v in ("untiered", "durable")}  # fmt: skip
    x = _by(lines, "untiered")[0]
    return ratio_row("S3 restore: bytes downloaded / bytes the ranks' loads read", ratios["untiered"],
                     "<= 1.10", at_most=1.10,
                     note=f"{x['bytes'] / 1e6:.0f} MB x {x['world']} ranks (DDP: each reads it "
                     f"whole); tiered with the tier removed {ratios['durable']:.2f}")  # fmt: skip


def restore_row(lines: list[dict[str, Any]]) -> Row:
    local, durable, untiered = (_by(lines, v) for v in ("local", "durable", "untiered"))
    wrong = [x["said"] for x in local if "local tier" not in x["said"]]
    wrong += [x["said"] for x in durable if "durable tier" not in x["said"]]
    ratio = median([a["s"] / b["s"] for a, b in zip(local, durable, strict=True)])
    note = (f"{local[0]['bytes'] / 1e6:.0f} MB: local tier (cold) "
            f"{median([x['s'] for x in local]):.2f} s, tier removed (from S3) "
            f"{median([x['s'] for x in durable]):.2f} s, untiered from S3 "
            f"{median([x['s'] for x in untiered]):.2f} s")  # fmt: skip
    if wrong:  # a restore that did not read the tier it was meant to: the figure means nothing
        return Row("tiered restore: local tier / S3 with the tier removed", None, "<= 0.25",
                   False, note=f"{note}; read the wrong tier: {wrong[0]!r}")  # fmt: skip
    return ratio_row(f"tiered restore: local tier / S3 with the tier removed ({CAP_MB_S:g} MB/s link)",
                     ratio, "<= 0.25", at_most=0.25, note=note)  # fmt: skip


def measure(sizes: Sizes, work: Path) -> list[Row]:
    os.environ.update(FAKE_ENV)  # for boto3 here and every rank
    (work / "tiers").mkdir(exist_ok=True)
    with moto_server(work / "moto_server-tiers.log") as endpoint:
        proxy = FaultProxy(upstream=endpoint, rate_mb_s=CAP_MB_S).start()
        try:
            args = {"d_model": 256, "n_layers": sizes.s3_layers, "repeats": sizes.repeats,
                    "endpoint": proxy.endpoint_url, "bucket": bucket_name(endpoint),
                    "work": str(work / "tiers")}  # fmt: skip
            lines = ranks("bench.worker", ["tiers", json.dumps(args)], env=FAKE_ENV)
            down = downloaded(proxy)
        finally:
            proxy.stop()
    return [*save_rows(lines), restore_row(lines), bytes_row(lines, down)]
