"""nanoGPT-style training, written as people write it: its own loop, AdamW with decay/no-decay
groups, warmup + cosine LambdaLR, a DataLoader with 2 workers over a map-style dataset, gradient
accumulation, clipping. `plain.py` runs under `torchrun --nproc-per-node 2 -m
examples.nanogpt.plain`; `train.py` is the same script converted to stockpot (`stockpot run
examples/nanogpt/config.yaml`); README's "Your own training loop" shows the diff."""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from examples.nanogpt.model import GPT, CharDataset, corpus, param_groups, warmup_cosine

max_steps, grad_accum, batch_size, lr, log_every = 200, 2, 8, 3e-3, 10


def train(rank: int, world: int) -> None:
    torch.manual_seed(0)
    dataset = CharDataset(corpus())
    model = DDP(GPT(dataset.vocab_size))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(20, max_steps))
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=2, drop_last=True)
    batches, epoch = iter(loader), 0
    for step in range(1, max_steps + 1):
        for _ in range(grad_accum):
            try:
                x, y = next(batches)
            except StopIteration:  # the epoch ended: reshuffle
                epoch += 1
                sampler.set_epoch(epoch)
                batches = iter(loader)
                x, y = next(batches)
            loss = model(x, y) / grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 and rank == 0:
            print(f"step {step} loss {loss.item() * grad_accum:.4f}")
        if step % 50 == 0 and rank == 0:
            torch.save(model.module.state_dict(), os.path.join("out", f"ckpt_{step}.pt"))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    os.makedirs("out", exist_ok=True)
    train(dist.get_rank(), dist.get_world_size())
    dist.destroy_process_group()
