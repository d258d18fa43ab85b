"""A real rank for checkpoint tests: trains a small model under DDP or FSDP2 and saves/restores.

    python -m tests.workers.ckpt_worker RUN_DIR --parallel ddp --steps 4 --dump out.pt
Env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (see tests/ranks.py); S3 settings from AWS_*.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.nn as nn

from orchestrator import dist
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.config.checkpoint import CheckpointConfig
from orchestrator.state import ModelAndOptimizer, RNGState
from orchestrator.storage import Store
from orchestrator.worker import exit_now


def build_model(width: int) -> nn.Module:
    torch.manual_seed(1234)  # identical init on every rank and every run
    return nn.Sequential(
        nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )


def wrap(model: nn.Module, parallel: str) -> nn.Module:
    if not dist.is_initialized() or parallel == "none":
        return model
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optim, options=opts)
    return {"model": msd, "optim": osd}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp", "none"])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save-every", type=int, default=0, help="0: save only at the end")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--restore", action="store_true", help="restore the latest before training")
    p.add_argument("--restore-step", type=int, help="restore this step instead of the latest")
    p.add_argument("--dump-at", type=int, help="with --dump: the state after this step instead")
    p.add_argument(
        "--slow-writes", action="store_true", help="checkpoint writes crawl (3 ms a write)"
    )
    p.add_argument("--local-dir", help="checkpoint.local_dir; {rank} names a node per rank")
    p.add_argument("--durable-every", type=int, help="checkpoint.durable_every_steps")
    p.add_argument("--dump", help="rank 0 writes the full model+optimizer state here (torch.save)")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s r{os.environ.get('RANK')} %(message)s"
    )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init(
            "gloo",
            int(os.environ["RANK"]),
            world,
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
        )
    if args.slow_writes:  # a background save is then still writing at the next steps
        _slow_writes()
    model = wrap(build_model(args.width), args.parallel)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(
        Store(args.run_dir),
        config=CheckpointConfig(
            every_steps=args.save_every or None,
            keep_last=args.keep_last,
            async_save=args.async_save,
            local_dir=args.local_dir.format(rank=dist.rank()) if args.local_dir else None,
            durable_every_steps=args.durable_every,
        ),
        parallel=args.parallel,
    )
    ckpt.register("train", ModelAndOptimizer(model, optim))
    ckpt.register("rng", RNGState(), per_rank=True)
    start = 0
    if args.restore and (info := ckpt.restore(args.restore_step)) is not None:
        start = info.step
    torch.manual_seed(99 + dist.rank() + start)
    for step in range(start + 1, start + args.steps + 1):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        ckpt.maybe_save(step, {"loss": loss.item()})
        if step == args.dump_at:
            _dump(full_state(model, optim), args.dump)
    if args.steps:
        ckpt.save_final(start + args.steps, {"loss": loss.item()})
    ckpt.close()
    if args.dump_at is None:
        _dump(full_state(model, optim), args.dump)
    dist.barrier()
    # Leave with the model alive: destroying DDP's Reducer can deadlock with gloo's thread.
    exit_now(0)


def _dump(state: dict, path: str | None) -> None:
    if path and dist.rank() == 0:
        torch.save(state, path)


def _slow_writes() -> None:
    import time

    from orchestrator.checkpoint.format import dcp_write

    original = dcp_write.HashingStream.write

    def write(stream, b):  # type: ignore[no-untyped-def]
        time.sleep(0.003)
        return original(stream, b)

    dcp_write.HashingStream.write = write  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
