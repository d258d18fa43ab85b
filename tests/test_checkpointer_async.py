"""The Checkpointer in one process, async saves (background.py): training goes on while a save is
written, one save at a time, and a background failure surfaces at the next call."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import MANUAL
from orchestrator.errors import CheckpointError
from orchestrator.storage import Store
from tests.checkpointer_fixtures import (
    GatedStore,
    checkpointer,
    fresh_restore,
    model_and_optimizer,
    train,
)
from tests.ckpt_helpers import assert_same

ASYNC = dataclasses.replace(MANUAL, async_save=True)  # saves when told, deletes nothing


def test_async_save_stages_then_commits_the_state_of_the_save_step(tmp_path: Path) -> None:
    gate = threading.Event()
    model, optim = model_and_optimizer()
    train(model, optim, 2)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = checkpointer(GatedStore(str(tmp_path), gate), model, optim, config=ASYNC)
    ckpt.save(2)
    train(model, optim, 3)  # training continues while the save is held open
    assert catalog.scan(Store(str(tmp_path))).committed == [], "not committed before the gate opens"
    gate.set()
    info = ckpt.wait()
    assert info is not None and info.step == 2
    ckpt.close()
    restored, _, _ = fresh_restore(str(tmp_path))
    assert_same(at_save, restored.state_dict())
    assert not torch.equal(restored[0].weight, model[0].weight)


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    gate = threading.Event()
    model, optim = model_and_optimizer()
    ckpt = checkpointer(GatedStore(str(tmp_path), gate), model, optim, config=ASYNC)
    ckpt.save(1)
    second = threading.Thread(target=ckpt.save, args=(2,))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive(), "the second save waits for the first"
    gate.set()
    second.join(timeout=60)
    ckpt.close()
    assert [c.step for c in catalog.scan(Store(str(tmp_path))).committed] == [1, 2]


def test_background_failure_surfaces_at_next_save_and_at_close(tmp_path: Path) -> None:
    model, optim = model_and_optimizer()
    ckpt = checkpointer(GatedStore(str(tmp_path), fail=True), model, optim, config=ASYNC)
    ckpt.save(1)  # returns: the failure happens in the background
    with pytest.raises(
        CheckpointError, match="step 1 not committed: OSError: injected: disk on fire"
    ):
        ckpt.save(2)  # raised before step 2 is staged: nothing new is in flight
    ckpt.save(3)
    with pytest.raises(CheckpointError, match="step 3 not committed"):
        ckpt.close()
    assert catalog.scan(Store(str(tmp_path))).committed == []
