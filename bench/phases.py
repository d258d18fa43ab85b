"""The rank side of the checkpoint benchmarks: what each rank of `python -m bench.worker PHASE`
runs (bench/worker.py builds the model first). save.py, load.py and s3.py launch these and turn
rank 0's JSON lines into rows; they import no torch themselves, so `make bench`'s own process
starts in a fraction of a second instead of ~4 s.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from bench.common import median
from bench.disk import evict, files_under, nbytes, raw_read, raw_write
from bench.s3 import MARK
from bench.worker import Trainee, emit, timed
from orchestrator import dist
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.tiered import OnDurable
from orchestrator.config.checkpoint import CheckpointConfig
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import S3Options, StorageOptions, Store

MAX_STEPS_DURING = 200  # a background save that outlasts this many steps is reported as is


# -- saving (save.py) --------------------------------------------------------------------------


def checkpointer(run: Path, trainee: Trainee, *, async_save: bool = False) -> Checkpointer:
    config = CheckpointConfig(every_steps=None, keep_last=1, async_save=async_save)
    ckpt = Checkpointer(Store(str(run)), config=config)
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


def sync_phase(trainee: Trainee, args: dict[str, Any]) -> None:
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


# -- restoring (load.py) -----------------------------------------------------------------------


def restore_phase(trainee: Trainee, args: dict[str, Any]) -> None:
    """One committed checkpoint, then restore and raw read alternately, both cold."""
    run = Path(args["work"]) / "load"
    ckpt = checkpointer(run, trainee)
    ckpt.save(1)
    files = files_under(run)
    size = sum(p.stat().st_size for p in files)
    for r in range(args["repeats"]):
        for name in ("raw", "restore") if r % 2 == 0 else ("restore", "raw"):
            if dist.rank() == 0:
                evict(files)
            fn = ckpt.restore if name == "restore" else lambda: _leader_read(files)
            emit(repeat=r, variant=name, s=timed(fn), bytes=size)
    ckpt.close()


def _leader_read(files: list[Path]) -> None:
    if dist.rank() == 0:
        raw_read(files)


# -- S3 (s3.py) --------------------------------------------------------------------------------


def _s3_checkpointer(
    args: dict[str, Any],
    trainee: Trainee,
    keep: int,
    prefix: str = "run",
    local_dir: Path | None = None,
    on_durable: OnDurable | None = None,
) -> Checkpointer:
    """A Checkpointer on s3://bucket/prefix; with `local_dir`, tiered (that dir its local tier)."""
    s3 = StorageOptions(s3=S3Options(endpoint_url=args["endpoint"]))
    store = Store(f"s3://{args['bucket']}/{prefix}", s3)
    config = CheckpointConfig(every_steps=None, keep_last=keep,
                              local_dir=None if local_dir is None else str(local_dir))  # fmt: skip
    ckpt = Checkpointer(store, config=config, on_durable=on_durable)
    ckpt.register("train", ModelAndOptimizer(trainee.model, trainee.optim))
    return ckpt


def s3_save_phase(trainee: Trainee, args: dict[str, Any]) -> None:
    """Sync saves to S3 alternating with one put_file of the same bytes from rank 0."""
    ckpt = _s3_checkpointer(args, trainee, keep=1)
    local = Path(args["work"]) / "s3raw.bin"
    if dist.rank() == 0:
        raw_write(local, trainee.state())
    fs = ckpt.store.fsspec_filesystem()
    size = nbytes(trainee.state())

    def put() -> None:
        if dist.rank() == 0:
            fs.put_file(str(local), f"{args['bucket']}/put/raw.bin")

    for r in range(args["repeats"]):
        for name in ("put", "save") if r % 2 == 0 else ("save", "put"):
            fn = put if name == "put" else functools.partial(ckpt.save, r + 1)
            emit(repeat=r, variant=name, s=timed(fn), bytes=size)
    ckpt.close()


def _mark(args: dict[str, Any], name: str) -> None:
    dist.barrier()  # every rank's requests for what came before are answered
    if dist.rank() == 0:
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(f"{args['endpoint']}/{MARK}/{name}", timeout=30).close()
    dist.barrier()


def requests_phase(trainee: Trainee, args: dict[str, Any]) -> None:
    """Per number kept, in its own run: keep+2 saves (the last ones run retention), then a
    fresh Checkpointer restores. One launch for every `keep`: the ranks start once."""
    for keep in args["keeps"]:
        ckpt = _s3_checkpointer(args, trainee, keep=keep, prefix=f"run-{keep}")
        _mark(args, f"{keep}-start")
        for step in range(1, keep + 3):
            ckpt.save(step)
            _mark(args, f"{keep}-save-{step}")
        ckpt.close()
        fresh = _s3_checkpointer(args, trainee, keep=keep, prefix=f"run-{keep}")
        fresh.restore()
        _mark(args, f"{keep}-restore")
        fresh.close()


# -- tiered checkpoints (tiers.py) -------------------------------------------------------------

UPLOAD_WAIT_S = 600.0  # how long a bench waits for an upload before the next save
BASE_STEPS = 10  # steps with no upload before each tiered save (~25 ms each at the S3 size)


def tiers_phase(trainee: Trainee, args: dict[str, Any]) -> None:
    """Saves with a local tier vs straight to S3, then restores from either tier: `endpoint` is
    the capped link to S3 for both sides."""
    tier = Path(args["work"]) / "tier"
    _tier_saves(trainee, args, tier)
    _tier_restores(trainee, args, tier)


def _tier_saves(trainee: Trainee, args: dict[str, Any], tier: Path) -> None:
    """Saves with a local tier and straight to S3, interleaved (the order alternates). After
    each tiered save, training steps run until its upload is durable, so the link is idle
    again for the next save; their time against steps just before says what the background
    upload costs training. One unreported save of each first (S3's first-save reads)."""
    uploads: list[float] = []  # the leader's upload seconds, one per durable step
    tiered = _s3_checkpointer(args, trainee, keep=1, prefix="tiered", local_dir=tier,
                              on_durable=lambda _step, s, _at_risk: uploads.append(s))  # fmt: skip
    straight = _s3_checkpointer(args, trainee, keep=1, prefix="straight")
    size = nbytes(trainee.state())
    straight.save(1)
    tiered.save(1)
    tiered.flush_durable(time.monotonic() + UPLOAD_WAIT_S)
    for r in range(args["repeats"]):
        for name in ("tiered", "straight") if r % 2 == 0 else ("straight", "tiered"):
            if name == "straight":
                s = timed(functools.partial(straight.save, r + 2))
                emit(repeat=r, variant=name, s=s, bytes=size)
                continue
            base = [_timed_step(trainee) for _ in range(BASE_STEPS)]
            s = timed(functools.partial(tiered.save, r + 2))
            during: list[float] = []
            while not dist.agree(len(uploads) > r + 1) and len(during) < MAX_STEPS_DURING:
                during.append(_timed_step(trainee))
            tiered.flush_durable(time.monotonic() + UPLOAD_WAIT_S)
            emit(repeat=r, variant=name, s=s, bytes=size, upload_s=uploads[-1] if uploads else None,
                 base_step_s=median(base), during_step_s=median(during) if during else None,
                 steps_during=len(during))  # fmt: skip
    straight.close()
    tiered.close()


class _Said(logging.Handler):
    """The leader's log lines, to tell which tier a restore read."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _tier_restores(trainee: Trainee, args: dict[str, Any], tier: Path) -> None:
    """The newest tiered step (durable, and on the local tier) restored by a fresh Checkpointer:
    from the local tier (cold), from S3 with the local tier moved away, and by an untiered
    Checkpointer straight from S3 (the same durable copy); the order rotates every repeat."""
    said = _Said()
    logger = logging.getLogger("orchestrator.checkpoint.checkpointer")
    logger.addHandler(said)
    logger.setLevel(logging.INFO)  # no logging set up in the bench's ranks: WARNING otherwise
    aside = tier.with_name(tier.name + ".aside")
    newest = max((tier / "checkpoints").glob("step-*"))  # the tier keeps local_keep steps
    size = sum(p.stat().st_size for p in files_under(newest))
    names = ["local", "durable", "untiered"]
    for r in range(args["repeats"]):
        for name in names[r % 3 :] + names[: r % 3]:
            if dist.rank() == 0:
                if name == "local":
                    evict(files_under(tier))
                elif name == "durable":
                    tier.rename(aside)
            dist.barrier()
            ckpt = _s3_checkpointer(args, trainee, keep=1, prefix="tiered",
                                    local_dir=None if name == "untiered" else tier)  # fmt: skip
            said.lines.clear()
            _mark(args, f"{r}-{name}-start")  # the bytes between the marks: the restore's
            s = timed(ckpt.restore)
            _mark(args, f"{r}-{name}-end")
            ckpt.close()
            read = next((x for x in said.lines if x.startswith("restored")), "")
            emit(repeat=r, variant=name, s=s, bytes=size, said=read, world=dist.world_size())
            if dist.rank() == 0 and name == "durable":
                shutil.rmtree(tier)
                aside.rename(tier)
            dist.barrier()
