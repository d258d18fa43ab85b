"""Hashing and drift: the config's stable hash, and which keys a resume must match."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from orchestrator.config.schema import Config, flatten


def config_hash(cfg: Config) -> str:
    """A stable hash of the resolved config: sha256 of its canonical JSON, 16 hex digits."""
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# Keys that never change what a step computes: resuming with other values is always fine.
# (trainer.nproc changes the world size: resume supports it and continues at the same global
# sample index; trainer.num_workers loads the same batches, orchestrator/loader.py;
# model.init_from is ignored once a run has checkpoints of its own;
# trainer.activation_checkpointing recomputes the same values: a run toggling it across a
# resume ends bit-identical, tests/test_training_extras.py; trainer.ema only reads the weights.)
_NON_COMPUTATIONAL = (
    "run.dir", "run.name", "trainer.max_steps", "trainer.nproc", "trainer.log_every",
    "trainer.eval_every", "trainer.device", "trainer.collective_timeout_s", "trainer.num_workers",
    "trainer.activation_checkpointing", "trainer.ema", "model.init_from",
    "checkpoint", "storage", "launcher", "resume", "soup", "sweep", "logging",
)  # fmt: skip


def computation_view(cfg: Config) -> dict[str, Any]:
    """The flattened config keys that change the computation (what a resume must match)."""
    return {k: v for k, v in flatten(cfg.to_dict()).items() if _computes(k)}


def _computes(key: str) -> bool:
    return not any(key == skip or key.startswith(skip + ".") for skip in _NON_COMPUTATIONAL)


def diff_views(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for every key that differs (missing shown as <unset>).

    A key that `old` lacks and `new` holds at its schema default is no change: the schema gained
    it after `old` was saved, and a new field's default must compute what the code did before
    it existed, so runs saved before the field was added still resume. A key that `old` holds
    but that no longer changes the computation (trainer.num_workers, once) is no change either.
    """
    old = {k: v for k, v in old.items() if _computes(k)}
    keys = sorted(set(old) | set(new))
    unset = "<unset>"
    defaults = _default_view()
    return [
        f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}"
        for k in keys
        if old.get(k, unset) != new.get(k, unset)
        and not (k not in old and k in defaults and new[k] == defaults[k])
    ]


@functools.cache
def _default_view() -> dict[str, Any]:
    return computation_view(Config())
