"""The resumable sampler and the eval split: properties over sizes, worlds and resume points."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.data import ResumableSampler, epoch_permutation
from orchestrator.tasks.base import eval_batches


@st.composite
def layouts(draw: st.DrawFn, max_world: int = 4) -> tuple[int, int, int]:
    """(dataset_len, batch_size, world_size) with at least one global batch per epoch."""
    world = draw(st.integers(1, max_world))
    batch = draw(st.integers(1, 8))
    n = draw(st.integers(batch * world, 120))
    return n, batch, world


def world_of(n: int, batch: int, world: int, seed: int = 0) -> list[ResumableSampler]:
    return [ResumableSampler(n, batch, r, world, seed) for r in range(world)]


def global_batch(samplers: list[ResumableSampler]) -> list[int]:
    """One step of every rank, concatenated in rank order: the global batch in global order."""
    return [i for s in samplers for i in s.next_indices().tolist()]


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**32))
def test_an_epoch_sees_each_sample_at_most_once_and_drops_only_the_tail(
    layout: tuple[int, int, int], seed: int
) -> None:
    n, batch, world = layout
    samplers = world_of(n, batch, world, seed)
    seen: list[int] = []
    for _ in range(n // (batch * world)):
        step = global_batch(samplers)
        assert len(step) == len(set(step)) == batch * world
        seen += step
    assert len(seen) == len(set(seen)) == n // (batch * world) * batch * world
    assert all(0 <= i < n for i in seen)
    assert all(s.epoch == 1 and s.index == 0 and s.epoch_just_ended for s in samplers)
    assert samplers[0].samples_seen == len(seen)


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(0, 1000), st.integers(0, 40))
def test_resume_from_any_point_gives_the_same_future(
    layout: tuple[int, int, int], seed: int, cut: int
) -> None:
    n, batch, world = layout
    straight = world_of(n, batch, world, seed)
    interrupted = world_of(n, batch, world, seed)
    for _ in range(cut):
        assert global_batch(straight) == global_batch(interrupted)
    states = [s.state_dict() for s in interrupted]
    assert all(state == states[0] for state in states)  # global: the same on every rank
    resumed = world_of(n, batch, world, seed=seed + 1)  # the saved seed wins
    for s, state in zip(resumed, states, strict=True):
        s.load_state_dict(state)
    for _ in range(2 * n // (batch * world) + 1):
        assert global_batch(resumed) == global_batch(straight)
    assert resumed[0].state_dict() == straight[0].state_dict()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 30), st.integers(16, 120), st.integers(0, 1000))
def test_a_smaller_world_continues_at_the_same_global_position(
    batch: int, cut: int, n: int, seed: int
) -> None:
    """2 ranks of B -> 1 rank of 2B: the same global batch size, so the very same samples."""
    two = world_of(n, batch, 2, seed)
    for _ in range(cut):
        global_batch(two)
    one = ResumableSampler(n, 2 * batch, 0, 1, seed)
    one.load_state_dict(two[0].state_dict())
    for _ in range(n // batch + 1):
        assert one.next_indices().tolist() == global_batch(two)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 20), st.integers(40, 120), st.integers(0, 1000))
def test_a_changed_global_batch_continues_the_same_global_order(
    batch: int, cut: int, n: int, seed: int
) -> None:
    """2 ranks of B -> 1 rank of B: the epoch's stream of samples picks up where it stopped."""
    two = world_of(n, batch, 2, seed)
    stream: list[int] = []
    for _ in range(cut % (n // (2 * batch))):  # stop inside epoch 0
        stream += global_batch(two)
    one = ResumableSampler(n, batch, 0, 1, seed)
    one.load_state_dict(two[0].state_dict())
    while one.epoch == 0:
        stream += one.next_indices().tolist()
    assert stream == epoch_permutation(n, seed, 0)[: n // batch * batch].tolist()


def test_set_world_keeps_the_global_position() -> None:
    sampler = ResumableSampler(100, 5, 0, 2, seed=3)
    sampler.next_indices()
    sampler.set_world(1, 4)
    assert sampler.index == 10
    peers = [ResumableSampler(100, 5, r, 4, seed=3) for r in range(4)]
    for peer in peers:
        peer.load_state_dict({"epoch": 0, "index": 10, "seed": 3, "samples_seen": 10})
    assert sampler.next_indices().tolist() == peers[1].next_indices().tolist()


@given(st.integers(0, 2**40), st.integers(0, 5))
def test_the_order_is_a_function_of_seed_and_epoch_only(seed: int, epoch: int) -> None:
    def first_batch() -> list[int]:
        sampler = ResumableSampler(50, 10, 0, 1, seed)
        sampler.load_state_dict({"epoch": epoch, "index": 0, "seed": seed, "samples_seen": 0})
        return sampler.next_indices().tolist()

    a = first_batch()
    torch.manual_seed(seed % 1000)  # the global RNG plays no part
    torch.rand(3)
    assert first_batch() == a


def test_seeds_and_epochs_give_different_orders() -> None:
    by_seed = {
        tuple(ResumableSampler(1000, 50, 0, 1, seed).next_indices().tolist()) for seed in range(5)
    }
    assert len(by_seed) == 5
    sampler = ResumableSampler(100, 50, 0, 1, seed=0)
    epochs = [
        sorted(sampler.next_indices().tolist() + sampler.next_indices().tolist()) for _ in range(2)
    ]
    assert epochs[0] == epochs[1] == list(range(100))
    assert sampler.epoch == 2


def test_epoch_just_ended_marks_only_the_last_batch_of_an_epoch() -> None:
    sampler = ResumableSampler(10, 3, 0, 1, seed=0)  # 3 batches per epoch, 1 sample dropped
    flags = []
    for _ in range(7):
        sampler.next_indices()
        flags.append((sampler.epoch_just_ended, sampler.epoch, sampler.index))
    assert flags == [
        (False, 0, 3), (False, 0, 6), (True, 1, 0),
        (False, 1, 3), (False, 1, 6), (True, 2, 0),
        (False, 2, 3),
    ]  # fmt: skip
    assert sampler.samples_seen == 21
    assert len(sampler) == 3


def test_without_drop_last_the_last_batch_wraps_around() -> None:
    sampler = ResumableSampler(10, 4, 0, 1, seed=0, drop_last=False)
    batches = [sampler.next_indices().tolist() for _ in range(3)]
    assert sampler.epoch_just_ended and sampler.epoch == 1
    assert {i for b in batches for i in b} == set(range(10))
    assert batches[2][2:] == batches[0][:2]


def test_a_larger_world_after_resume_starts_the_next_epoch_when_no_batch_fits() -> None:
    small = ResumableSampler(10, 2, 0, 1, seed=0)
    for _ in range(3):
        small.next_indices()
    big = ResumableSampler(10, 2, 0, 4, seed=0)
    big.load_state_dict(small.state_dict())  # index 6: no room for a global batch of 8
    big.next_indices()
    assert (big.epoch, big.index, big.epoch_just_ended) == (1, 0, True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 4, 0, 3), r"global batch 4\*3=12 exceeds the dataset \(10 samples\)"),
        ((10, 0, 0, 1), "batch_size must be >= 1"),
        ((10, 2, 2, 2), "rank 2 is not in a world of size 2"),
        ((0, 1, 0, 1), "the dataset is empty"),
    ],
)
def test_bad_layouts_are_one_line_value_errors(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        ResumableSampler(*args, seed=0)
    assert "\n" not in str(info.value)


def test_a_state_with_missing_keys_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks samples_seen"):
        ResumableSampler(10, 2, 0, 1, 0).load_state_dict({"epoch": 0, "index": 0, "seed": 0})


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.integers(1, 17), st.integers(1, 8))
def test_eval_batches_cover_each_sample_once_in_lockstep(n: int, batch: int, world: int) -> None:
    per_rank = [list(eval_batches(n, batch, r, world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # the same number of forwards on every rank
    flat = [i for batches in per_rank for b in batches for i in b.tolist()]
    assert flat == list(range(n))
    assert all(len(b) <= batch and b.dtype == torch.int64 for bs in per_rank for b in bs)
