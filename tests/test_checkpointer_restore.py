"""The Checkpointer in one process, restoring: verification, fallback past a bad checkpoint,
and what a tampered or truncated file cannot do."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from devtools.s3server import FaultProxy
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint import checkpointer as checkpointer_module
from orchestrator.checkpoint.checkpointer import MANUAL
from orchestrator.errors import CheckpointCorrupt
from orchestrator.storage import Store
from tests.checkpointer_fixtures import (
    checkpointer,
    flip_a_byte,
    fresh_restore,
    model_and_optimizer,
    train,
)
from tests.ckpt_helpers import assert_same
from tests.fixtures.s3 import s3_storage


def test_flipped_byte_falls_back_loudly_to_the_previous_checkpoint(tmp_path: Path, caplog) -> None:
    model, optim = model_and_optimizer()
    ckpt = checkpointer(Store(str(tmp_path)), model, optim)
    train(model, optim)
    ckpt.save(1)
    at_one = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, optim)
    ckpt.save(2)
    shard = flip_a_byte(tmp_path / "checkpoints/step-000000002")
    with caplog.at_level(logging.ERROR):
        restored, _, info = fresh_restore(str(tmp_path))
    assert info.step == 1
    assert_same(at_one, restored.state_dict())
    assert "step-000000002 FAILED verification" in caplog.text and shard.name in caplog.text
    with pytest.raises(CheckpointCorrupt, match=f"{shard.name}: checksum mismatch"):
        fresh_restore(str(tmp_path), step=2)


def test_the_newest_checkpoint_is_checked_by_its_own_load(tmp_path: Path, monkeypatch) -> None:
    """The small files (DCP's `.metadata`, unpickled by the load; the rank's state) are checked
    before the load starts; the shards are hashed by the load as it reads them (a Tap), so
    their bytes are read once and no separate pass reads them; the state is the saved one."""
    model, optim = model_and_optimizer()
    train(model, optim)
    ckpt = checkpointer(Store(str(tmp_path)), model, optim)
    ckpt.save(1)
    at_one = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[str] = []  # the files verified apart, or "load"
    taps = []
    verify, load_shards = catalog.verify, checkpointer_module.load_shards

    def spying(*args, names, **kwargs):
        seen.append(" ".join(sorted(names)))
        return verify(*args, names=names, **kwargs)

    def loading(*args, tap, **kwargs):
        seen.append("load")
        taps.append(tap)
        return load_shards(*args, tap=tap, **kwargs)

    monkeypatch.setattr(catalog, "verify", spying)
    monkeypatch.setattr(checkpointer_module, "load_shards", loading)
    restored, _, info = fresh_restore(str(tmp_path))
    assert info.step == 1
    assert_same(at_one, restored.state_dict())
    assert seen == [".metadata ranks/rank-00000.json", "load"]
    assert sorted(taps[0].got) == ["__0_0.distcp", "__0_optim.distcp"]
    step = tmp_path / "checkpoints/step-000000001"
    assert {n: e.size for n, e in taps[0].got.items()} == {
        n: (step / n).stat().st_size for n in taps[0].got
    }


def test_no_verifying_checkpoint_refuses_to_start_over(tmp_path: Path) -> None:
    """Every committed checkpoint is bad: the restore raises with the fix instead of training
    from scratch on a state that holds part of the newest (it was loaded while checked)."""
    model, optim = model_and_optimizer()
    ckpt = checkpointer(Store(str(tmp_path)), model, optim)
    for step in (1, 2):
        train(model, optim)
        ckpt.save(step)
    for step in (1, 2):
        flip_a_byte(tmp_path / f"checkpoints/step-{step:09d}")
    with pytest.raises(
        CheckpointCorrupt, match=r"none of the 2 committed checkpoint\(s\).*stockpot verify"
    ):
        fresh_restore(str(tmp_path))


def test_size_check_runs_even_with_checksums_off(tmp_path: Path) -> None:
    model, optim = model_and_optimizer()
    ckpt = checkpointer(Store(str(tmp_path)), model, optim)
    ckpt.save(1)
    ckpt.save(2)
    shard = next((tmp_path / "checkpoints/step-000000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    sizes_only = dataclasses.replace(MANUAL, verify_checksums=False)
    fresh = checkpointer(Store(str(tmp_path)), *model_and_optimizer(), config=sizes_only)
    assert fresh.restore().step == 1


def test_tampered_dcp_metadata_cannot_run_code(tmp_path: Path) -> None:
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    model, optim = model_and_optimizer()
    checkpointer(Store(str(tmp_path)), model, optim).save(1)
    (tmp_path / "checkpoints/step-000000001/.metadata").write_bytes(pickle.dumps(Evil()))
    from orchestrator.checkpoint.format import stored_items

    with pytest.raises(CheckpointCorrupt, match=r"refusing to load posix\.system"):
        stored_items(Store(str(tmp_path)), "checkpoints/step-000000001")
    assert not (tmp_path / "pwned").exists()


def test_a_restore_from_s3_downloads_the_checkpoint_once(
    s3_faults: FaultProxy, s3_bucket: str
) -> None:
    """The load verifies the shards it reads (a Tap): a restore from S3 downloads the
    checkpoint's bytes about once (shards, small files, manifests and listings), not twice
    (the load, then a checksum pass over the same shards). Counted at the proxy, in bytes."""
    storage = s3_storage(s3_faults.endpoint_url)
    url = f"{s3_bucket}/run"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
    optim = torch.optim.AdamW(model.parameters())
    train_wide(model, optim)
    checkpointer(Store(url, storage), model, optim).save(1)
    saved = catalog.scan(Store(url, storage)).latest()
    assert saved is not None
    size = saved.manifest.total_bytes
    fresh = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256))
    fresh_optim = torch.optim.AdamW(fresh.parameters())
    before = s3_faults.carried[1]
    info = checkpointer(Store(url, storage), fresh, fresh_optim).restore()
    down = s3_faults.carried[1] - before
    assert info is not None and info.step == 1
    assert_same(model.state_dict(), fresh.state_dict())
    assert size <= down < 1.2 * size, f"{down} bytes downloaded for a {size}-byte checkpoint"


def train_wide(model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 256)).pow(2).mean().backward()
    optim.step()
