"""The baseline for the loop-overhead benchmark: the demo's training, hand-written.

Same task, model, DDP, AdamW + warmup/cosine schedule, sampler and batch size as
`configs/demo.yaml`, with nothing else: no checkpoints, no metrics, no stop checks.
Rank 0 prints {"steps_per_s": ...} measured from step `trainer.log_every` to the end: the
span `stockpot run`'s rate is read from (its first and last progress lines).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from orchestrator import dist, parallel
from orchestrator.config import load
from orchestrator.data import ResumableSampler
from orchestrator.optim import build_optimizer, build_scheduler
from orchestrator.tasks import build_task
from orchestrator.worker import exit_now


def main(config: str, overrides: list[str]) -> None:
    cfg = load(config, overrides)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    dist.init("gloo", rank, world, "127.0.0.1", int(os.environ["MASTER_PORT"]))
    task = build_task(cfg.task.target, dict(cfg.task.params))
    torch.manual_seed(cfg.run.seed)
    model = parallel.wrap(task.build_model(), "ddp", device="cpu")
    optim = build_optimizer(model, cfg.optim)
    sched = build_scheduler(optim, cfg.scheduler, lambda: cfg.trainer.max_steps)
    data = task.train_set()
    sampler = ResumableSampler(len(data), cfg.trainer.batch_size, rank, world, cfg.run.seed)
    warmup = cfg.trainer.log_every
    for step in range(cfg.trainer.max_steps):
        if step == warmup:
            t0 = time.perf_counter()
        task.loss(model, data.batch(sampler.next_indices())).backward()
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
    rate = (cfg.trainer.max_steps - warmup) / (time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"steps_per_s": rate}), flush=True)
    dist.barrier()
    exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
