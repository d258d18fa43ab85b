"""Background saves without a copy up front (checkpoint/snapshot.py): the writer reads live
tensors until the optimizer's next step, which copies only what is not written yet."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from orchestrator.checkpoint.background import BackgroundSaver
from orchestrator.checkpoint.checkpointer import MANUAL, Checkpointer
from orchestrator.checkpoint.format import dcp_write
from orchestrator.checkpoint.snapshot import LazyCopy
from orchestrator.state import ModelAndOptimizer, RNGState
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same

ASYNC = dataclasses.replace(MANUAL, async_save=True)  # saves when told, deletes nothing


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _train(model: nn.Module, optim: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        model(torch.randn(8, 64)).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()


def _checkpointer(url: str, model: nn.Module, optim: torch.optim.Optimizer, **kw) -> Checkpointer:
    ckpt = Checkpointer(Store(url), **kw)
    ckpt.register("train", ModelAndOptimizer(model, optim))
    ckpt.register("rng", RNGState(), per_rank=True)
    return ckpt


def _background(ckpt: Checkpointer) -> BackgroundSaver:
    assert ckpt.background is not None, "an async Checkpointer has a background saver"
    return ckpt.background


def _state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    optim_sd = optim.state_dict()
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optim": {i: {k: clone(v) for k, v in s.items()} for i, s in optim_sd["state"].items()},
    }


def _restored(url: str, step: int) -> dict:
    model, optim = _model()
    _train(model, optim)  # differs from anything saved, and has optimizer state to overwrite
    info = _checkpointer(url, model, optim).restore(step=step)
    assert info is not None and info.step == step
    return _state(model, optim)


class _SlowWrites:
    """Each tensor the shard writer starts to write stalls until `go` is set: the writer is
    then inside a tensor it has taken (LazyCopy.take), with the rest of the state not yet read.
    (Stalling the first bytes of a file instead could catch the optimizer file's byte items
    first, before any tensor is taken: then the step has nothing to wait for.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.go, self.inside = threading.Event(), threading.Event()
        original = dcp_write.write_tensor

        def write_tensor(stream, tensor):
            self.inside.set()
            assert self.go.wait(timeout=60)
            return original(stream, tensor)

        monkeypatch.setattr(dcp_write, "write_tensor", write_tensor)


def test_training_during_a_held_write_leaves_the_save_as_it_was(
    tmp_path: Path, monkeypatch
) -> None:
    """The optimizer steps while the writer is stuck inside the first tensor: the step copies
    the rest, waits for that tensor, and every byte saved is the state of the save step."""
    model, optim = _model()
    _train(model, optim, 2)
    at_save = _state(model, optim)
    ckpt = _checkpointer(str(tmp_path), model, optim, config=ASYNC)
    slow = _SlowWrites(monkeypatch)
    ckpt.save(2)
    assert slow.inside.wait(timeout=60)
    lazy = _background(ckpt).lazy_copy
    assert lazy is not None
    threading.Timer(0.3, slow.go.set).start()
    t0 = time.perf_counter()
    _train(model, optim)  # the pre-step hook copies, then waits out the tensor being written
    assert time.perf_counter() - t0 >= 0.2, "the step waited for the tensor being written"
    _train(model, optim, 3)
    ckpt.close()
    # Every tensor saved (model weights and buffers, optimizer moments and step counters) is
    # copied but those being written, whichever the writers took first (two threads, one file
    # each, so at most two tensors): never those, and nothing else is left uncopied.
    sizes = sorted(t.nbytes for t in at_save["model"].values())
    sizes += [v.nbytes for s in at_save["optim"].values() for v in s.values() if torch.is_tensor(v)]
    held = sum(sizes) - lazy.copied_bytes
    assert lazy.copied_bytes > 0 and 0 < held <= sum(sorted(sizes)[-2:]), lazy.copied_bytes
    assert_same(at_save, _restored(str(tmp_path), 2))
    assert not torch.equal(at_save["model"]["0.weight"], model[0].weight)


def test_a_write_that_ends_before_the_next_step_copies_nothing(tmp_path: Path) -> None:
    model, optim = _model()
    ckpt = _checkpointer(str(tmp_path), model, optim, config=ASYNC)
    states = {}
    for step in (1, 2, 3):
        _train(model, optim)
        states[step] = _state(model, optim)
        ckpt.save(step)
        lazy = _background(ckpt).lazy_copy
        ckpt.wait()  # written and committed before the optimizer's next step
        _train(model, optim)
        assert lazy is not None and lazy.copied_bytes == 0
    ckpt.close()
    assert _background(ckpt).copy_buffer_bytes == 0, "no copy was ever needed"
    for step in (1, 2, 3):
        assert_same(states[step], _restored(str(tmp_path), step))


def test_copies_reuse_their_buffers_save_to_save(tmp_path: Path, monkeypatch) -> None:
    """Steps taken before the writer starts copy the whole state, into the same buffers every
    time: one allocation for the run, as with the eager staging copy."""
    model, optim = _model()
    ckpt = _checkpointer(str(tmp_path), model, optim, config=ASYNC)
    gate = threading.Event()
    original = dcp_write.ShardWriter.write_data

    def held(self, plan, planner):
        assert gate.wait(timeout=60)
        return original(self, plan, planner)

    monkeypatch.setattr(dcp_write.ShardWriter, "write_data", held)
    states, addresses = {}, []
    for step in (1, 2, 3):
        _train(model, optim)
        states[step] = _state(model, optim)
        ckpt.save(step)
        _train(model, optim)  # before the writer starts: everything is copied
        buffers = [_background(ckpt).copy_buffer(p) for p in model.parameters()]
        addresses.append([b.data_ptr() for b in buffers if b is not None])
        gate.set()
        ckpt.wait()
        gate.clear()
    ckpt.close()
    assert len(addresses[0]) == len(list(model.parameters()))
    assert addresses[0] == addresses[1] == addresses[2]
    for step in (1, 2, 3):
        assert_same(states[step], _restored(str(tmp_path), step))


def test_a_model_without_optimizer_is_staged_up_front(tmp_path: Path) -> None:
    model, _ = _model()
    ckpt = Checkpointer(Store(str(tmp_path)), config=ASYNC)
    ckpt.register("model", ModelAndOptimizer(model))
    at_save = model[0].weight.detach().clone()
    ckpt.save(1)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # nothing says when a bare model changes: it was copied
    ckpt.close()
    background = _background(ckpt)
    staged = background.staged["model"]["model"]["0.weight"]
    assert background.lazy_copy is None and staged.data_ptr() != model[0].weight.data_ptr()
    back, _ = _model()
    restore = Checkpointer(Store(str(tmp_path)))
    restore.register("model", ModelAndOptimizer(back))
    restore.restore()
    assert torch.equal(back[0].weight, at_save)


def test_lazy_copy_counts_aliases_and_refuses_an_uncounted_read() -> None:
    a, b = torch.arange(4.0), torch.arange(8.0)
    lazy = LazyCopy([a, b, a.view(4)], {})
    lazy.expect([a, a.view(4)])  # two items on this rank, both of a; b is another's
    assert lazy.take(a) is a
    lazy.release()
    lazy.freeze()
    assert lazy.copied_bytes == a.nbytes, "a is read once more; b is written by another rank"
    a.add_(100.0)
    again = lazy.take(a.view(4))
    assert again is not a and torch.equal(again, torch.arange(4.0))
    with pytest.raises(RuntimeError, match="after it was released"):
        lazy.take(b)
