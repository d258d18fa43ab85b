"""One rank of the checkpoint benchmark: how long a save blocks training, sync vs async.

Trains a CharLM (2 ranks, DDP) and saves it with its AdamW state; prints one JSON line per
save from rank 0: {"mode", "blocked_s" (what training waited), "total_s" (to commit), "bytes"}.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from orchestrator import dist, parallel
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store
from orchestrator.tasks.charlm import CharLM
from orchestrator.worker import exit_now


def main(run_dir: str, mode: str, repeats: int, d_model: int, n_layers: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init(
            "gloo", int(os.environ["RANK"]), world, "127.0.0.1", int(os.environ["MASTER_PORT"])
        )
    task = CharLM(seq_len=64, d_model=d_model, n_layers=n_layers, n_heads=8)
    torch.manual_seed(0)
    model = parallel.wrap(task.build_model(), "ddp", device="cpu")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = task.train_set()
    ckpt = Checkpointer(Store(run_dir), async_save=mode == "async")
    ckpt.register("train", ModelAndOptimizer(model, optim))
    for i in range(repeats):  # the first async save allocates its staging buffers
        task.loss(model, data.batch(torch.arange(4))).backward()
        optim.step()
        optim.zero_grad()
        t0 = time.perf_counter()
        ckpt.save(i + 1)
        blocked = time.perf_counter() - t0
        ckpt.wait()
        total = time.perf_counter() - t0
        if dist.rank() == 0:
            size = catalog.scan(Store(run_dir)).latest().manifest.total_bytes
            print(
                json.dumps({"mode": mode, "blocked_s": blocked, "total_s": total, "bytes": size}),
                flush=True,
            )
    ckpt.close()
    dist.barrier()
    exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
