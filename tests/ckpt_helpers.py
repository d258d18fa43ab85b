"""Shared helpers for checkpoint tests: comparing nested states, runs on local disk or S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.format import load_flat, stored_items
from orchestrator.storage import Store


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (
            f"{where}: keys {a.keys()} != {b.keys()}"
        )
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load_dump(path: Any) -> Any:
    return torch.load(path, weights_only=True)


def final_state(run_dir: Path | str, step: int | None = None) -> dict[str, Any]:
    """Model and optimizer (`train.*`) and trainer.ema's averages (`ema_*`) of the newest
    checkpoint, as DCP flat entries; the newest must be at `step`, when given."""
    store = Store(str(run_dir))
    info = catalog.scan(store).latest()
    assert info is not None and (step is None or info.step == step), f"{run_dir}: newest {info}"
    return _load(store, info.data_rel, ("train.", "ema_"))


def state_at(run_dir: Path | str, step: int, prefix: str = "train.model.") -> dict[str, Any]:
    """The entries under `prefix` of the committed checkpoint at `step`, as DCP flat entries."""
    store = Store(str(run_dir))
    found = [c for c in catalog.scan(store).committed if c.step == step]
    assert found, f"{run_dir}: no committed checkpoint at step {step}"
    return _load(store, found[0].data_rel, prefix)


def _load(store: Store, data_rel: str, prefix: str | tuple[str, ...]) -> dict[str, Any]:
    keys = list(stored_items(store, data_rel))
    return load_flat(store, data_rel, [k for k in keys if k.startswith(prefix)])
