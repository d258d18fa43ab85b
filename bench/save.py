"""Saving against the disk: sync save vs a raw write, `torch.save` and plain `dcp.save`; async
save's stall, its background write speed and what it does to step time.

The rank side (`sync_phase`, `async_phase`) runs inside bench.worker; `measure` launches it and
turns the medians into rows. Every variant writes the same state: a CharLM with AdamW, 2 ranks.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from bench.common import Row, Sizes, median, ranks, ratio_row
from bench.disk import nbytes, raw_write
from bench.worker import Trainee, emit, timed
from orchestrator import dist
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.retention import RetentionPolicy
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store

MAX_STEPS_DURING = 200  # a background save that outlasts this many steps is reported as is


def checkpointer(run: Path, trainee: Trainee, *, async_save: bool = False) -> Checkpointer:
    ckpt = Checkpointer(Store(str(run)), policy=RetentionPolicy(keep_last=1), async_save=async_save)
    ckpt.register("train", ModelAndOptimizer(trainee.model, trainee.optim))
    return ckpt


def _on_leader(fn: Any) -> Any:
    return lambda: fn() if dist.rank() == 0 else None


def _torch_save(path: Path, state: Any) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _dcp_save(trainee: Trainee, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(trainee.model, trainee.optim)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def rank_phase(trainee: Trainee, args: dict[str, Any]) -> None:
    """Sync save and its baselines, interleaved; the order rotates every repeat."""
    work = Path(args["work"])
    ckpt = checkpointer(work / "run", trainee)
    state = trainee.state()
    size = nbytes(state)
    steps = itertools.count(1)
    variants = {
        "raw": _on_leader(lambda: raw_write(work / "raw.bin", state)),
        "stockpot": lambda: ckpt.save(next(steps)),
        "torch.save": _on_leader(lambda: _torch_save(work / "torch.pt", state)),
        "dcp.save": lambda: _dcp_save(trainee, work / "dcp"),
    }
    # Untimed before each: every variant writes where nothing is. Freeing the previous copy's
    # blocks (~0.1 s per 155 MB here) is retention's work, which stockpot does on a background
    # thread after the save (upkeep.py); its `wait()` joins that thread.
    before = {
        "raw": _on_leader(lambda: (work / "raw.bin").unlink(missing_ok=True)),
        "stockpot": ckpt.wait,
        "torch.save": _on_leader(lambda: (work / "torch.pt").unlink(missing_ok=True)),
        "dcp.save": _on_leader(lambda: shutil.rmtree(work / "dcp", ignore_errors=True)),
    }
    names = list(variants)
    for r in range(args["repeats"]):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            before[name]()
            emit(repeat=r, variant=name, s=timed(variants[name]), bytes=size)
    ckpt.close()


def async_phase(trainee: Trainee, args: dict[str, Any]) -> None:
    """Per repeat: a raw write, steps with no save, then an async save and the steps taken while
    it is written. The first save only allocates the staging buffers and is not reported."""
    work = Path(args["work"])
    ckpt = checkpointer(work / "async", trainee, async_save=True)
    size = nbytes(trainee.state())
    ckpt.save(1)
    ckpt.wait()
    for r in range(args["repeats"]):
        raw_s = timed(_on_leader(lambda: raw_write(work / "raw.bin", trainee.state())))
        base = [_timed_step(trainee) for _ in range(args.get("base_steps", 3))]
        ckpt.last_save_s = None  # set by the background thread once the save commits
        dist.barrier()
        t0 = time.perf_counter()
        ckpt.save(r + 2)
        stall = max(dist.all_gather_objects(time.perf_counter() - t0))
        during: list[float] = []
        while not dist.agree(ckpt.last_save_s is not None) and len(during) < MAX_STEPS_DURING:
            during.append(_timed_step(trainee))
        ckpt.wait()
        assert ckpt.last_save_s is not None
        emit(repeat=r, raw_s=raw_s, stall_s=stall, background_s=ckpt.last_save_s - stall,
             base_step_s=median(base), during_step_s=median(during) if during else None,
             steps_during=len(during), bytes=size)  # fmt: skip
    ckpt.close()


def _timed_step(trainee: Trainee) -> float:
    t0 = time.perf_counter()
    trainee.step()
    dist.agree(False)  # the same collective the loop during a save takes, so steps compare
    return time.perf_counter() - t0


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
