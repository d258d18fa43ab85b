"""A data loader with worker processes whose position and randomness resume exactly.

`ResumableLoader` yields this rank's batches in exactly the order `ResumableSampler` gives
them, whatever `num_workers`. Three choices make that hold:

- The stream is endless. The DataLoader's sampler (`_Positions`) never ends, so its iterator
  is never restarted at an epoch end (no workers to reap and re-fork, nothing to leak or
  deadlock there); epochs are counted by the sampler the loader advances as batches are
  consumed, which is why `persistent_workers` is not needed. Only `load_state_dict` restarts
  the workers, from the restored position.
- The position is the CONSUMED one. Workers run ahead (`prefetch_factor` batches each); the
  loader advances its own `ResumableSampler` only when the training loop takes a batch, and
  `state_dict()` is that sampler's: the same keys, saved under the same checkpoint name, so
  checkpoints of the bare sampler resume here and back. Each batch carries the position it
  was drawn at, checked against the consumed one.
- Randomness is a function of the batch's place in the stream. Right before a batch is
  fetched, python's `random`, numpy's global RNG and torch's CPU generator are seeded from
  (seed, rank, samples seen before the batch): the same global position gives the same
  augmentation in the training process (num_workers=0) or in any worker, before and after a
  resume. That is how the workers' RNG is "restored": nothing of a worker's RNG is saved, it is
  re-derived for every batch. In the training process the three states are saved before the
  fetch and put back after it, so its own streams (dropout, the checkpointed RNG) are as if no
  data had been loaded. Only the CPU generator is seeded: the CUDA ones are the model's.
  Elementwise augmentations are bit-identical across worker counts; a reduction inside a fetch
  may differ in its last bits, since workers run one torch thread.

Why not torchdata's `StatefulDataLoader`: its state is per worker (a snapshot per worker id,
the last worker to yield, the workers' base seed), and a worker's random stream is seeded per
worker (base seed + worker id), so an augmented batch depends on which worker fetched it: the
same run with 0 or 2 workers trains on different data, and its checkpoint is tied to the
worker count. Nor could its state be the `sampler` entry that existing checkpoints hold. It
would also be a new dependency for ~250 lines that keep all three properties above.

Two kinds of dataset are served: one with `__getitem__(i)` (a map-style dataset, as a user's
script brings; samples are merged by `collate_fn`, torch's `default_collate` by default), and,
without `__getitem__`, the task protocol's `batch(indices) -> tuple of tensors`
(orchestrator/tasks/base.py), fetched in one call.

Workers are forked (torch's default on Linux) when the first batch is asked for. A stop signal
is the rank's to handle: workers ignore SIGTERM and SIGUSR2 (Slurm signals every process of a
step), so they keep serving until the rank has saved; they leave when the rank closes the
loader, and die with it otherwise (PR_SET_PDEATHSIG), so an scancel, whose SIGKILL follows, or a
killed rank takes them along.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import random
import signal
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from orchestrator import preemption
from orchestrator.data import ResumableSampler

# Where a batch sits in the run's data stream: (seed, samples seen before it, rank).
Position = tuple[int, int, int]

_PR_SET_PDEATHSIG = 1


class ResumableLoader:
    """This rank's training batches from `num_workers` processes (0: in this process)."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = True,
        multiprocessing_context: str | None = None,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0 (got {num_workers!r})")
        self._fetch = _SeededFetch(dataset, collate_fn)
        self._sampler = ResumableSampler(
            len(dataset), batch_size, rank, world_size, seed, drop_last=drop_last
        )
        self._rank = rank
        self.num_workers = num_workers
        self._context = multiprocessing_context
        self._batches: Iterator[tuple[Position, Any]] | None = None

    @property
    def epoch(self) -> int:
        return self._sampler.epoch

    @property
    def epoch_just_ended(self) -> bool:
        """True right after the batch that ended an epoch was taken."""
        return self._sampler.epoch_just_ended

    @property
    def samples_seen(self) -> int:
        return self._sampler.samples_seen

    def __len__(self) -> int:
        """Global batches per epoch."""
        return len(self._sampler)

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> Any:
        """The next batch; the stream is endless (epochs roll over)."""
        if self._batches is None:
            self._batches = iter(self._data_loader())
        drawn_at, batch = next(self._batches)
        expected = self._position()
        if drawn_at != expected:
            raise RuntimeError(f"loader out of step: got batch {drawn_at}, expected {expected}")
        self._sampler.next_indices()
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position of the batches taken so far (prefetched ones are not counted)."""
        return self._sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; running workers are stopped, the next batch
        restarts them from there."""
        self.close()
        self._sampler.load_state_dict(state)

    def close(self) -> None:
        """Stop the workers (quick: idle ones leave at once). Iterating again restarts them."""
        batches, self._batches = self._batches, None
        if batches is not None:
            _stop_workers(batches)

    def _position(self) -> Position:
        return _position(self._sampler, self._rank)

    def _data_loader(self) -> DataLoader[Any]:
        return DataLoader(
            self._fetch,  # type: ignore[arg-type]
            batch_size=None,  # the items are whole batches already
            sampler=_Positions(lambda: copy.deepcopy(self._sampler), self._rank),
            num_workers=self.num_workers,
            collate_fn=_as_is,
            worker_init_fn=_init_worker if self.num_workers else None,
            multiprocessing_context=self._context if self.num_workers else None,
            # Workers' base seed: drawn from this generator, not the global one, which must not
            # move (num_workers=0 stays bit-identical to loading without a DataLoader).
            generator=torch.Generator().manual_seed(0),
        )


class _Positions:
    """The DataLoader's sampler: from the loader's consumed position when an iterator starts,
    every batch's (position, indices), endlessly."""

    def __init__(self, start: Callable[[], ResumableSampler], rank: int) -> None:
        self._start, self._rank = start, rank

    def __iter__(self) -> Iterator[tuple[Position, torch.Tensor]]:
        sampler = self._start()
        while True:
            position = _position(sampler, self._rank)
            yield position, sampler.next_indices()


def _position(sampler: ResumableSampler, rank: int) -> Position:
    return sampler.state_dict()["seed"], sampler.samples_seen, rank


class _SeededFetch:
    """The dataset as the DataLoader sees it: an item is a (position, indices) pair, fetched
    with every RNG seeded from the position."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        if not hasattr(dataset, "__len__"):
            raise TypeError(f"{type(dataset).__name__} has no __len__: give a sized dataset")
        self._items = hasattr(dataset, "__getitem__")
        if not self._items and not callable(getattr(dataset, "batch", None)):
            raise TypeError(
                f"{type(dataset).__name__} has neither __getitem__(i) nor batch(indices): "
                "give a map-style dataset or a task dataset"
            )
        if not self._items and collate_fn is not None:
            raise ValueError(
                f"{type(dataset).__name__}.batch(indices) returns whole batches: drop collate_fn"
            )
        self._dataset = dataset
        self._collate = collate_fn or default_collate

    def __getitem__(self, item: tuple[Position, torch.Tensor]) -> tuple[Position, Any]:
        position, indices = item
        with _seeded(_batch_seed(position)):
            if self._items:
                batch = self._collate([self._dataset[i] for i in indices.tolist()])
            else:
                batch = self._dataset.batch(indices)
        return position, batch


def _batch_seed(position: Position) -> int:
    """63 bits from the position; a hash, so neighbouring batches get unrelated streams."""
    digest = hashlib.blake2b(repr(position).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """python, numpy and torch (CPU) seeded from `seed` inside; their states put back after."""
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])


def _as_is(batch: Any) -> Any:
    return batch


def _init_worker(worker_id: int) -> None:
    """In each worker: stop signals are the rank's (see the module docstring), and the worker
    dies with the rank (Linux; elsewhere torch's watchdog ends it within seconds). Strictly, with
    the thread that forked it: iterate the loader from the main thread, or one that outlives it.
    A forked worker inherits the rank's flag-setting handlers, harmless but not its to run; a
    spawned one (multiprocessing_context) would have the default action, death, until here."""
    preemption.ignore_stop_signals()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _stop_workers(batches: Iterator[Any]) -> None:
    """Shut a DataLoader iterator's workers down now, not when it is garbage collected.

    torch has no public call for it; `_shutdown_workers` is what its `__del__` runs. It sends
    each worker a stop and joins it, then SIGTERMs any still alive, which ours ignore: those
    (stuck in a fetch) are SIGKILLed."""
    workers = list(getattr(batches, "_workers", ()))
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
