"""Synthetic classification: a fixed random "teacher" MLP labels Gaussian inputs.

`split="pretrain"` draws x ~ N(0, I); `split="finetune"` draws from a shifted, rescaled
distribution labelled by the same teacher, so a model pretrained on one and fine-tuned on the
other improves on the finetune held-out set. All data comes from generators seeded by
`data_seed` (never the global RNG): every rank builds the same data whatever its torch seed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.errors import require
from orchestrator.tasks.base import Batch, Tensors

Split = Literal["pretrain", "finetune"]

# Independent generator streams derived from data_seed; the split streams are per split, so
# the pretrain data does not change when the finetune data is drawn, and vice versa.
_TEACHER, _SHIFT = 0, 1
_STREAMS = {("pretrain", "train"): 2, ("pretrain", "eval"): 3}
_STREAMS |= {("finetune", "train"): 4, ("finetune", "eval"): 5}
_STREAMS |= {("pretrain", "test"): 6, ("finetune", "test"): 7}  # soup reports only


def _generator(data_seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(data_seed * 1_000_003 + stream)


class SyntheticClassification:
    """A teacher-labelled classification task; the student is a plain ReLU MLP."""

    def __init__(
        self,
        split: Split = "pretrain",
        in_dim: int = 32,
        classes: int = 10,
        hidden: int = 64,
        depth: int = 2,
        teacher_hidden: int = 128,
        n_train: int = 20000,
        n_eval: int = 2000,
        shift: float = 1.0,
        data_seed: int = 0,
        noise: float = 0.0,
    ) -> None:
        require(split in _SPLITS, f"task.split must be one of {', '.join(_SPLITS)} (got {split!r})")
        for key, value, low in (
            ("in_dim", in_dim, 1),
            ("classes", classes, 2),
            ("hidden", hidden, 1),
            ("depth", depth, 1),
            ("teacher_hidden", teacher_hidden, 1),
            ("n_train", n_train, 1),
            ("n_eval", n_eval, 1),
            ("data_seed", data_seed, 0),
        ):
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"task.{key} must be an integer >= {low} (got {value!r})",
            )
        require(0.0 <= noise <= 1.0, f"task.noise must be in [0, 1] (got {noise!r})")
        self.split: Split = split
        self.in_dim, self.classes, self.hidden, self.depth = in_dim, classes, hidden, depth
        self.n_train, self.n_eval = n_train, n_eval
        self.shift, self.data_seed, self.noise = float(shift), data_seed, float(noise)
        self._teacher = _Teacher(in_dim, teacher_hidden, classes, _generator(data_seed, _TEACHER))
        self._cache: dict[str, Tensors] = {}

    @property
    def name(self) -> str:
        return f"synthetic-{self.split}"

    def build_model(self) -> nn.Module:
        """The student (uses torch's global RNG: the caller seeds it)."""
        layers: list[nn.Module] = []
        width = self.in_dim
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            width = self.hidden
        layers.append(nn.Linear(width, self.classes))
        return nn.Sequential(*layers)

    def train_set(self) -> Tensors:
        return self._dataset("train", self.n_train)

    def eval_set(self) -> Tensors:
        return self._dataset("eval", self.n_eval)

    def test_set(self) -> Tensors:
        """A third split of n_eval samples from its own stream (the soup report's test set)."""
        return self._dataset("test", self.n_eval)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        x, y = batch
        with torch.no_grad():
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            correct = (logits.argmax(dim=-1) == y).sum()
        return {"loss": loss.item(), "accuracy": float(correct.item()), "count": float(len(y))}

    def _dataset(self, part: str, n: int) -> Tensors:
        if part not in self._cache:
            gen = _generator(self.data_seed, _STREAMS[(self.split, part)])
            x = self._inputs(n, gen)
            y = self._teacher.label(x)
            if self.noise > 0:
                flip = torch.rand(n, generator=gen) < self.noise
                y = torch.where(flip, torch.randint(self.classes, (n,), generator=gen), y)
            self._cache[part] = Tensors(x, y)
        return self._cache[part]

    def _inputs(self, n: int, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.in_dim, generator=gen)
        if self.split == "pretrain":
            return z
        # The finetune distribution: a mean shift along a fixed random direction and a
        # different per-dimension scale (both from their own stream: the same for train/eval).
        shift_gen = _generator(self.data_seed, _SHIFT)
        direction = torch.randn(self.in_dim, generator=shift_gen)
        direction /= direction.norm()
        scale = torch.empty(self.in_dim).uniform_(0.5, 2.0, generator=shift_gen)
        return z * scale + self.shift * direction


_SPLITS = ("pretrain", "finetune")


class _Teacher:
    """A fixed random two-layer tanh MLP; labels are the argmax of its logits."""

    def __init__(self, in_dim: int, hidden: int, classes: int, gen: torch.Generator) -> None:
        self.w1 = torch.randn(in_dim, hidden, generator=gen) / in_dim**0.5
        self.b1 = torch.randn(hidden, generator=gen) * 0.5
        self.w2 = torch.randn(hidden, classes, generator=gen) / hidden**0.5
        self.b2 = torch.zeros(classes)
        # Centre each class's logit on N(0, I) inputs: without it a few classes take most of
        # the samples and "always say the majority class" is already a good score.
        self.b2 = -self.logits(torch.randn(4096, in_dim, generator=gen)).mean(dim=0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def label(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=-1)
