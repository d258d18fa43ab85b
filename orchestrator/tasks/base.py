"""What the training loop needs from a task, and the small pieces the bundled tasks share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]


@runtime_checkable
class Dataset(Protocol):
    """Indexable by a LongTensor of sample indices; returns CPU tensors (the loop moves them)."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> Batch: ...


@runtime_checkable
class Task(Protocol):
    """A model, its data and its loss. The caller seeds torch before `build_model`; datasets
    must not depend on the global RNG, so every rank sees the same data whatever its seed."""

    @property
    def name(self) -> str: ...

    def build_model(self) -> nn.Module: ...

    def train_set(self) -> Dataset: ...

    def eval_set(self) -> Dataset: ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean loss of one batch (what backward is called on)."""
        ...

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """SUMS over one batch, including "count"; the loop all-reduces them and divides by
        count. Must accept an empty batch (see `eval_batches`)."""
        ...


@runtime_checkable
class HasTestSet(Protocol):
    """Optional for a task: a test split, disjoint from train and eval. Soup reports score on
    it; selection (greedy, learned) never does. `None`: this task instance has none."""

    def test_set(self) -> Dataset | None: ...


class Tensors:
    """Equal-length tensors indexed together along their first dimension (a TensorDataset)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        if not tensors:
            raise ValueError("Tensors needs at least one tensor")
        lengths = {len(t) for t in tensors}
        if len(lengths) != 1:
            raise ValueError(f"tensors differ in length: {[len(t) for t in tensors]}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def batch(self, indices: torch.Tensor) -> Batch:
        return tuple(t[indices] for t in self.tensors)


def eval_batches(n: int, batch_size: int, rank: int, world_size: int) -> Iterator[torch.Tensor]:
    """This rank's eval batches: rank r owns the contiguous range [r*n//W, (r+1)*n//W), so every
    sample is evaluated exactly once across ranks, none dropped.

    Every rank yields the same number of batches (a rank with one sample fewer may end with an
    empty one): under FSDP each forward all-gathers parameters, so a rank that stopped early
    would leave the others waiting forever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    largest_share = -(-n // world_size)
    for k in range(-(-largest_share // batch_size)):
        lo = min(start + k * batch_size, stop)
        yield torch.arange(lo, min(lo + batch_size, stop))
