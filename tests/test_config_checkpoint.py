"""The `checkpoint:` section's types (orchestrator/config/checkpoint.py): one message per rule,
naming the user's key, from YAML and from Python; and the section, as loaded, is what the
Checkpointer's schedule and retention read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator import config
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.retention import Candidate, RetentionHooks, plan_retention
from orchestrator.config.checkpoint import CheckpointConfig, KeepBest, RetentionPolicy, SaveSchedule
from orchestrator.errors import ConfigError
from orchestrator.storage import Store

KEEP_LAST = r"^checkpoint.keep_last must be an integer >= 1 \(got 0\); use null to keep every \w+$"


def test_a_bad_keep_last_gives_the_one_message_however_it_is_set() -> None:
    with pytest.raises(ConfigError, match=KEEP_LAST):
        config.load(None, ["checkpoint.keep_last=0"])
    with pytest.raises(ConfigError, match=KEEP_LAST):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ConfigError, match=KEEP_LAST):
        RetentionPolicy(keep_last=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": -3}, r"^checkpoint.keep_last must be an integer >= 1 \(got -3\)"),
        ({"keep_last": True}, r"checkpoint.keep_last .*got True"),  # bool is an int subclass
        ({"keep_last": 1.5}, r"checkpoint.keep_last .*got 1.5"),
        ({"keep_every_steps": 0}, r"^checkpoint.keep_every_steps must be .*; use null to turn it"),
        ({"keep_weights_every_steps": 0}, r"^checkpoint.keep_weights_every_steps must be"),
        ({"keep_best": None}, r"^checkpoint.keep_best must be a KeepBest \(got None\); KeepBest()"),
        ({"every_steps": 0}, r"^checkpoint.every_steps must be .*use null to disable step-based"),
        ({"every_epochs": False}, r"^checkpoint.every_epochs must be an integer >= 1 \(got False"),
        ({"every_minutes": 0}, r"^checkpoint.every_minutes must be a number > 0 \(got 0\)"),
        ({"every_minutes": float("nan")}, r"^checkpoint.every_minutes must be a number > 0"),
    ],
)
def test_each_rule_names_the_users_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CheckpointConfig(**kwargs)


@pytest.mark.parametrize("bad", [(), ("",), ("eval/loss", 3)])
def test_keep_weights_improved_needs_metric_names(bad: tuple) -> None:
    with pytest.raises(ConfigError, match=r"^checkpoint.keep_weights_improved must list metric"):
        RetentionPolicy(keep_weights_improved=bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "loss", "k": 0}, r"^checkpoint.keep_best.k must be >= 1 \(got 0\)$"),
        ({"metric": "loss", "k": True}, r"checkpoint.keep_best.k must be >= 1 \(got True\)"),
        ({"metric": "loss", "mode": "median"}, r"checkpoint.keep_best.mode must be 'min' or 'max'"),
        ({"metric": ""}, r"checkpoint.keep_best.metric must name a metric .*use null"),
    ],
)
def test_keep_best_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        KeepBest(**kwargs)


def test_hooks_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"^keep_if must be callable \(got int\)$"):
        RetentionHooks(keep_if=3)  # type: ignore[arg-type]


def test_the_section_keeps_its_key_order() -> None:
    """The base order of CheckpointConfig decides it: config.yaml and docs/config.md follow."""
    assert [f.name for f in dataclasses.fields(CheckpointConfig)] == [
        "every_steps", "every_epochs", "every_minutes",
        "keep_last", "keep_best", "keep_every_steps", "keep_weights_every_steps",
        "keep_weights_improved", "local_dir", "local_keep", "durable_every_steps",
        "durable_every_minutes", "upload_mb_s", "async_save", "verify_checksums",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("checkpoint.local_dir=''", r"checkpoint.local_dir must be a directory path or null"),
        ("checkpoint.local_keep=0", r"checkpoint.local_keep must be an integer >= 1"),
        ("checkpoint.durable_every_steps=0", r"checkpoint.durable_every_steps must be an integer"),
        ("checkpoint.durable_every_minutes=-1", r"checkpoint.durable_every_minutes must be a numb"),
        ("checkpoint.upload_mb_s=0", r"checkpoint.upload_mb_s must be a number > 0"),
    ],
)
def test_tier_settings_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_the_loaded_keep_best_is_the_retention_rule() -> None:
    cfg = config.load(None, ["checkpoint.keep_best.metric=eval/loss", "checkpoint.keep_best.k=2"])
    assert cfg.checkpoint.keep_best == KeepBest("eval/loss", "min", 2)
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best.mode must be one of min, max"):
        config.load(None, ["checkpoint.keep_best.mode=median"])
    committed = [Candidate(step=s, metrics={"eval/loss": float(s)}) for s in (1, 2, 3, 4, 5)]
    assert plan_retention(committed, cfg.checkpoint).delete == []  # keep_last 3 + the 2 best
    without = dataclasses.replace(cfg.checkpoint, keep_best=KeepBest())
    assert plan_retention(committed, without).delete == [1, 2]


def test_keep_best_without_a_metric_is_off() -> None:
    """The config's default (`metric: null`) keeps nothing extra, alone or beside other rules."""
    committed = [Candidate(step=s, metrics={"loss": float(s)}) for s in (10, 20, 30, 40)]
    off = RetentionPolicy(keep_last=None)
    assert not off.has_rules and off.keep_best == KeepBest()
    assert plan_retention(committed, off).delete == []
    assert plan_retention(committed, RetentionPolicy(keep_last=1)).delete == [10, 20, 30]
    on = RetentionPolicy(keep_last=1, keep_best=KeepBest("loss", "min", 1))
    assert plan_retention(committed, on).delete == [20, 30]


def _counting(ckpt: Checkpointer) -> Checkpointer:
    ckpt.register("counter", save=dict, load=lambda state: None)
    return ckpt


def test_the_loaded_section_is_the_checkpointers_schedule_and_retention(tmp_path: Path) -> None:
    """What the runner does: the section goes in as it is, no field copied on the way."""
    section = config.load(None, ["checkpoint.every_steps=2", "checkpoint.keep_last=2"]).checkpoint
    assert isinstance(section, SaveSchedule) and isinstance(section, RetentionPolicy)
    ckpt = _counting(Checkpointer(Store(str(tmp_path)), config=section))
    saved = [step for step in range(1, 10) if ckpt.maybe_save(step)]
    ckpt.close()
    assert saved == [2, 4, 6, 8]
    assert [c.step for c in catalog.scan(Store(str(tmp_path))).committed] == [6, 8]


def test_without_a_config_it_saves_only_when_told_and_deletes_nothing(tmp_path: Path) -> None:
    """Not the section's defaults (every 50 steps, keep 3): the soup writer commits into a
    training run's dir with a bare Checkpointer, which must not thin that run."""
    ckpt = _counting(Checkpointer(Store(str(tmp_path))))
    assert not any(ckpt.maybe_save(step) for step in (50, 100))
    for step in range(1, 6):
        ckpt.save(step)
    ckpt.close()
    assert [c.step for c in catalog.scan(Store(str(tmp_path))).committed] == [1, 2, 3, 4, 5]


def test_the_python_api_hooks_ride_beside_the_config(tmp_path: Path) -> None:
    hooks = RetentionHooks(keep_if=lambda c: c.step == 1)
    cfg = CheckpointConfig(keep_last=1)
    ckpt = _counting(Checkpointer(Store(str(tmp_path)), config=cfg, retention_hooks=hooks))
    for step in (1, 2, 3):
        ckpt.save(step)
    ckpt.close()
    assert [c.step for c in catalog.scan(Store(str(tmp_path))).committed] == [1, 3]
