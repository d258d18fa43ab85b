"""A task whose training batches are augmented with python, numpy and torch randomness: what the
data loader must reproduce exactly for any number of workers and across a resume."""

from __future__ import annotations

import random

import numpy as np
import torch

from orchestrator.tasks.base import Batch, Tensors
from orchestrator.tasks.synthetic import SyntheticClassification


class Augmented:
    """`data` with Gaussian noise (torch), a random scale (numpy) and a random sign per batch
    (python) on its first tensor; all elementwise, so bit-identical on any thread count."""

    def __init__(self, data: Tensors) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: torch.Tensor) -> Batch:
        x, *rest = self.data.batch(indices)
        sign = -1.0 if random.random() < 0.5 else 1.0
        scale = float(np.random.uniform(0.8, 1.2))
        return ((x + 0.3 * torch.randn(x.shape)) * (sign * scale), *rest)


class AugmentedSynthetic(SyntheticClassification):
    def train_set(self) -> Augmented:  # type: ignore[override]
        return Augmented(super().train_set())
