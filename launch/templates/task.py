"""A stockpot task: your model, your data and your loss, in one class. Made by `stockpot init`;
replace the model and the data with yours, keep the five methods.

    stockpot run NAME/config.yaml                   # train here (2 local ranks), resuming
    stockpot run NAME/config.yaml trainer.nproc=1   # one process
    stockpot plot runs/NAME --out curves.png        # loss and eval curves

What stockpot asks of a task (orchestrator.tasks.base.Task):
- `build_model` is deterministic given torch's seed (stockpot seeds it, the same on every rank);
- the datasets never touch the global RNG (every rank must see the same data);
- `loss` returns the mean loss of a batch (what backward is called on);
- `eval_sums` returns SUMS plus "count" (stockpot adds them over ranks and divides), and takes
  an empty batch too, running the model anyway (under FSDP every rank's forward gathers).
Every key of the config's `task:` block but `_target_` is passed to `__init__`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.tasks.base import Batch, Tensors


class Task:
    name = "my-task"

    def __init__(
        self,
        n_features: int = 16,
        n_classes: int = 4,
        hidden: int = 64,
        n_train: int = 4096,
        n_eval: int = 512,
        data_seed: int = 0,
    ) -> None:
        self.n_features, self.n_classes, self.hidden = n_features, n_classes, hidden
        # In-memory data from a private generator: the same on every rank, whatever its seed.
        # Replace with your own tensors (loaded from disk, a tokenizer's output, ...).
        g = torch.Generator().manual_seed(data_seed)
        x = torch.randn(n_train + n_eval, n_features, generator=g)
        teacher = torch.randn(n_features, n_classes, generator=g)
        y = (x @ teacher).argmax(dim=1)
        self._train = Tensors(x[:n_train], y[:n_train])
        self._eval = Tensors(x[n_train:], y[n_train:])

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(self.n_features, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.n_classes),
        )

    def train_set(self) -> Tensors:
        return self._train

    def eval_set(self) -> Tensors:
        return self._eval

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        x, y = batch
        logits = model(x)  # also for an empty batch: every rank runs the same forwards
        if len(y) == 0:
            return {"loss": 0.0, "accuracy": 0.0, "count": 0.0}
        return {
            "loss": F.cross_entropy(logits, y, reduction="sum").item(),
            "accuracy": float((logits.argmax(dim=1) == y).sum()),
            "count": float(len(y)),
        }
