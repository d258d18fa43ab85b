"""Soups in the workflow: weights-only retention (the ingredients kept cheaply).

A run with keep_last=2 and keep_weights_every_steps holds optimizer state only for its newest 2
checkpoints; every kept one verifies; resume never picks a weights-only one; the soup engine
reads them; a real SIGKILL while optimizer state is being dropped leaves every manifest naming
only files that exist (and the next save's sweep removes what the kill left).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.layout import MANIFEST_NAME, is_optimizer_file
from orchestrator.checkpoint.retention import Candidate, RetentionPolicy, plan
from orchestrator.errors import CheckpointCorrupt
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store

REPO = Path(__file__).resolve().parents[1]


def _checkpointer(url: str, **kw) -> tuple[Checkpointer, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    ckpt = Checkpointer(Store(url), **kw)
    ckpt.register("train", ModelAndOptimizer(model, optim))
    return ckpt, model, optim


def _train_and_save(ckpt: Checkpointer, model: nn.Module, optim, steps: range) -> None:
    for step in steps:
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()
        ckpt.save(step, {"eval/loss": 1.0 / step})


def _names_only_existing(run: Path) -> None:
    """Every committed manifest names only files that exist, whole (sizes and checksums)."""
    store = Store(str(run))
    for info in catalog.scan(store).committed:
        assert catalog.verify(store.child(info.rel), info.manifest) == [], info.rel


def test_plan_thins_weights_rule_steps_and_keeps_full_ones_whole() -> None:
    cands = [Candidate(s, {}) for s in range(1, 9)]
    policy = RetentionPolicy(keep_last=2, keep_weights_every_steps=2)
    todo = plan(cands, policy)
    assert todo.delete == [1, 3, 5] and todo.drop_optimizer == [2, 4, 6]
    # Already thinned ones are not thinned again; a protected step stays whole.
    cands = [Candidate(s, {}, weights_only=s in (2, 4)) for s in range(1, 9)]
    assert plan(cands, policy, protected=(6,)).drop_optimizer == []


def test_keep_last_2_with_weights_every_2_holds_optimizer_state_only_for_the_last_2(
    tmp_path: Path,
) -> None:
    policy = RetentionPolicy(keep_last=2, keep_weights_every_steps=2)
    ckpt, model, optim = _checkpointer(str(tmp_path), policy=policy)
    _train_and_save(ckpt, model, optim, range(1, 10))
    found = catalog.scan(Store(str(tmp_path))).committed
    assert [c.step for c in found] == [2, 4, 6, 8, 9]
    with_optim = {c.step for c in found if any(map(is_optimizer_file, c.manifest.files))}
    assert with_optim == {8, 9}
    assert {c.step for c in found if c.manifest.weights_only} == {2, 4, 6}
    on_disk = {p.parent.name for p in tmp_path.glob("checkpoints/*/__*_optim.distcp")}
    assert on_disk == {"step-000000008", "step-000000009"}
    _names_only_existing(tmp_path)
    thin = json.loads((tmp_path / "checkpoints/step-000000002" / MANIFEST_NAME).read_bytes())
    assert thin["version"] == 2 and thin["weights_only"] is True
    full = next(c for c in found if c.step == 9).manifest.total_bytes
    weights = next(c for c in found if c.step == 6).manifest.total_bytes
    assert weights < full / 2  # AdamW's two moments are twice the model

    shown = subprocess.run(
        [sys.executable, "-m", "launch", "status", str(tmp_path), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    kinds = {c["step"]: c["kind"] for c in json.loads(shown.stdout)["checkpoints"]}
    assert kinds == {2: "weights", 4: "weights", 6: "weights", 8: "full", 9: "full"}

    # Resume takes the newest full one; a weights-only one is refused by name, never loaded.
    fresh, _, _ = _checkpointer(str(tmp_path))
    assert fresh.restore().step == 9
    with pytest.raises(CheckpointCorrupt, match="weights-only"):
        _checkpointer(str(tmp_path))[0].restore(step=6)
    # After the full ones go too (a later run's retention), resume still never picks a thin one.
    for step in (8, 9):
        Store(str(tmp_path)).delete(f"checkpoints/step-{step:09d}", recursive=True)
    assert _checkpointer(str(tmp_path))[0].restore() is None


def test_soup_reads_weights_only_checkpoints(tmp_path: Path) -> None:
    policy = RetentionPolicy(keep_last=1, keep_weights_every_steps=1)
    ckpt, model, optim = _checkpointer(str(tmp_path / "run"), policy=policy)
    _train_and_save(ckpt, model, optim, range(1, 5))
    thin = [c for c in catalog.scan(Store(str(tmp_path / "run"))).committed]
    assert [c.manifest.weights_only for c in thin] == [True, True, True, False]
    out = tmp_path / "soup"
    done = subprocess.run(
        [sys.executable, "-m", "launch", "soup", str(tmp_path / "run"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "SOUP.json").read_text())
    assert len(record["ingredients"]) == 4


_DROPPER = """
import os, sys, time
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.retention import drop_optimizer
from orchestrator.storage import Store

class Stalling(Store):
    # A real store that announces the phase it reached, then stalls there to be killed.
    def write_bytes(self, rel, data, *, create_only=False):
        if rel.endswith("MANIFEST.json") and sys.argv[2] == "manifest":
            self._stall()
        super().write_bytes(rel, data, create_only=create_only)

    def delete(self, rel, *, recursive=False):
        if sys.argv[2] == "deletes" and rel.endswith("optim.distcp"):
            self._stall()  # the new manifest is in place, the optimizer files not yet deleted
        super().delete(rel, recursive=recursive)

    def _stall(self):
        open(sys.argv[3], "w").close()
        time.sleep(120)

run = Stalling(sys.argv[1])
info = next(c for c in catalog.scan(run).committed if c.step == 1)
drop_optimizer(run, info)
"""


@pytest.mark.parametrize("phase", ["manifest", "deletes"])
def test_sigkill_while_dropping_optimizer_state_leaves_manifests_naming_existing_files(
    tmp_path: Path, phase: str
) -> None:
    run = tmp_path / "run"
    ckpt, model, optim = _checkpointer(str(run))
    _train_and_save(ckpt, model, optim, range(1, 3))
    reached = tmp_path / "reached"
    child = subprocess.Popen(
        [sys.executable, "-c", _DROPPER, str(run), phase, str(reached)], cwd=REPO
    )
    deadline = time.monotonic() + 120
    while not reached.exists():
        assert child.poll() is None and time.monotonic() < deadline, "dropper never got there"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL

    _names_only_existing(run)
    step1 = next(c for c in catalog.scan(Store(str(run))).committed if c.step == 1)
    # Killed before the new manifest: still whole and full. After it: weights only, and the
    # optimizer file the kill left unnamed is removed by the next job's first save (its sweep).
    assert step1.manifest.weights_only is (phase == "deletes")
    ckpt, model, optim = _checkpointer(str(run))
    _train_and_save(ckpt, model, optim, range(3, 4))
    left = sorted(p.name for p in (run / "checkpoints/step-000000001").iterdir())
    assert ("__0_optim.distcp" in left) is (phase == "manifest")
    _names_only_existing(run)
