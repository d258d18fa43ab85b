"""A resumable, deterministic distributed sampler keyed by a global sample index.

Every rank holds the same global position (`epoch`, `index`) into the epoch's permutation; one
call to `next_indices()` consumes one global batch of `batch_size * world_size` samples and
returns this rank's slice of it. Because the position is global, a checkpoint written by any
rank resumes the data stream exactly, and under a different world size it continues from the
same sample of the same permutation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

_STATE_KEYS = ("epoch", "index", "seed", "samples_seen")


def epoch_permutation(dataset_len: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a function of (seed, epoch) only, never of the global RNG."""
    # A plain arithmetic mix: Python's hash() of a tuple is salted per process for str, and a
    # mix that differs between processes would give each rank its own permutation.
    mixed = (seed * 1_000_003 + epoch) % 2**63
    return torch.randperm(dataset_len, generator=torch.Generator().manual_seed(mixed))


class ResumableSampler:
    """Deterministic distributed batches: global batch k of epoch e is
    `epoch_permutation(n, seed, e)[k*B*W : (k+1)*B*W]`, and rank r takes its r-th run of B.

    With `drop_last` (the default) the tail of an epoch that cannot fill a whole global batch is
    dropped: an epoch yields `n // (B*W)` global batches and no sample twice. Without it, the
    last global batch is filled up by wrapping to the start of the same permutation (a few
    samples repeat), so every rank still gets exactly `batch_size` indices.

    The epoch rolls over eagerly: the call that returns the last batch of epoch e leaves the
    sampler at (e + 1, 0) with `epoch_just_ended` set, so a checkpoint taken right then resumes
    at the start of the next epoch and `epoch` counts the epochs completed.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        drop_last: bool = True,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"the dataset is empty (dataset_len={dataset_len})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self._n = dataset_len
        self._batch_size = batch_size
        self._drop_last = drop_last
        self._seed = seed
        self._epoch = 0
        self._index = 0
        self._samples_seen = 0
        self._epoch_just_ended = False
        self._cached: tuple[tuple[int, int], torch.Tensor] | None = None
        self.set_world(rank, world_size)

    def set_world(self, rank: int, world_size: int) -> None:
        """Change this rank's place in the world; the global position stays where it is."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        global_batch = self._batch_size * world_size
        if global_batch > self._n:
            raise ValueError(
                f"global batch {self._batch_size}*{world_size}={global_batch} exceeds the "
                f"dataset ({self._n} samples); lower trainer.batch_size or use fewer ranks"
            )
        self._rank = rank
        self._world_size = world_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def index(self) -> int:
        """Global position inside the current epoch's permutation (a multiple of B*W)."""
        return self._index

    @property
    def samples_seen(self) -> int:
        """Samples consumed by all ranks together since the start of the run."""
        return self._samples_seen

    @property
    def epoch_just_ended(self) -> bool:
        """True right after the `next_indices()` call that returned an epoch's last batch."""
        return self._epoch_just_ended

    def __len__(self) -> int:
        """Global batches per epoch."""
        return self._batches_per_epoch(self._batch_size * self._world_size)

    def next_indices(self) -> torch.Tensor:
        """This rank's `batch_size` sample indices (int64) of the next global batch."""
        global_batch = self._batch_size * self._world_size
        if self._index >= self._batches_per_epoch(global_batch) * global_batch:
            # Only after a resume under a larger world: the old position leaves no full batch.
            self._start_epoch(self._epoch + 1)
        start = self._index + self._rank * self._batch_size
        positions = torch.arange(start, start + self._batch_size) % self._n
        indices = self._permutation()[positions]
        self._index += global_batch
        self._samples_seen += global_batch
        self._epoch_just_ended = self._index >= self._batches_per_epoch(global_batch) * global_batch
        if self._epoch_just_ended:
            self._start_epoch(self._epoch + 1)
        return indices

    def state_dict(self) -> dict[str, int]:
        """The global position: identical on every rank, independent of the world size."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self._seed,
            "samples_seen": self._samples_seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved global position (any world size).

        The saved seed wins over the constructor's: the stream must continue with the
        permutation it was drawn from.
        """
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"sampler state lacks {', '.join(missing)} (got {sorted(state)})")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self._n:
            raise ValueError(f"sampler state out of range: epoch {epoch}, index {index}")
        self._seed = int(state["seed"])
        self._start_epoch(epoch)
        self._index = index
        self._samples_seen = int(state["samples_seen"])
        self._epoch_just_ended = False

    def _batches_per_epoch(self, global_batch: int) -> int:
        return self._n // global_batch if self._drop_last else -(-self._n // global_batch)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._index = 0

    def _permutation(self) -> torch.Tensor:
        key = (self._seed, self._epoch)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, epoch_permutation(self._n, self._seed, self._epoch))
        return self._cached[1]
