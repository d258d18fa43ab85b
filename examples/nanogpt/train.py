"""nanoGPT-style training, written as people write it: its own loop, AdamW with decay/no-decay
groups, warmup + cosine LambdaLR, a DataLoader with 2 workers over a map-style dataset, gradient
accumulation, clipping. `plain.py` runs under `torchrun --nproc-per-node 2 -m
examples.nanogpt.plain`; `train.py` is the same script converted to stockpot (`stockpot run
examples/nanogpt/config.yaml`); README's "Your own training loop" shows the diff."""

import torch

import orchestrator
from examples.nanogpt.model import GPT, CharDataset, corpus, param_groups, warmup_cosine

grad_accum, batch_size, lr = 2, 8, 3e-3


def train(t) -> None:
    max_steps, log_every = t.max_steps, t.cfg.trainer.log_every
    dataset = CharDataset(corpus())
    model = t.wrap(GPT(dataset.vocab_size))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(20, max_steps))
    loader = t.loader(dataset, batch_size=batch_size, num_workers=2)
    t.register(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)
    batches = iter(loader)
    for step in t.steps():
        for _ in range(grad_accum):
            x, y = next(batches)
            loss = model(x, y) / grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0:
            t.log(step, loss=loss.item() * grad_accum)


def main(cfg) -> None:
    with orchestrator.training(cfg) as t:
        train(t)
