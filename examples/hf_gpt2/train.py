"""A Hugging Face `transformers` model trained by its own script: GPT-2 (a small config, no
download), AdamW with the usual no-decay groups, `transformers.get_scheduler`, a resumable data
loader. `stockpot run examples/hf_gpt2/config.yaml`; soups and export read its checkpoints
like any other (README: "Your own training loop")."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, get_scheduler

import orchestrator
from examples.nanogpt.model import CharDataset, corpus


def main(cfg) -> None:
    p = cfg.task.params
    with orchestrator.training(cfg) as t:
        dataset = CharDataset(corpus(), block_size=int(p.get("block_size", 32)))
        config = GPT2Config(
            vocab_size=dataset.vocab_size, n_positions=dataset.block_size,
            n_embd=int(p.get("n_embd", 32)), n_layer=int(p.get("n_layer", 2)), n_head=2,
        )  # fmt: skip
        model = t.wrap(GPT2LMHeadModel(config))
        no_decay = ("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")
        groups = [
            {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
             "weight_decay": 0.01},
            {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
             "weight_decay": 0.0},
        ]  # fmt: skip
        optimizer = torch.optim.AdamW(groups, lr=float(p.get("lr", 1e-3)))
        scheduler = get_scheduler(
            "cosine", optimizer, num_warmup_steps=10, num_training_steps=t.max_steps
        )
        loader = t.loader(dataset, num_workers=int(p.get("num_workers", 2)))
        t.register(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)
        batches = iter(loader)
        for step in t.steps():
            x, _ = next(batches)
            loss = model(input_ids=x, labels=x).loss  # the model shifts the labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % cfg.trainer.log_every == 0:
                t.log(step, loss=loss, lr=scheduler.get_last_lr()[0])
