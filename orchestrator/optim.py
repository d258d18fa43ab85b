"""Optimizer and learning-rate schedule from the config.

Built in: AdamW/SGD and warmup + cosine/constant/warmup-stable-decay (wsd). Or any class by `_target_`: a name in
`torch.optim` (`torch.optim.lr_scheduler` for schedules) or an import path, built with the
section's `kwargs`. `check_targets` builds both on a throwaway parameter, so a bad path, class
or keyword fails as one ConfigError before the model trains.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from orchestrator.config import OptimConfig, SchedulerConfig
from orchestrator.errors import ConfigError

Schedule = torch.optim.lr_scheduler.LRScheduler


class TargetError(ConfigError):
    """`check_targets`' problem, raised on every rank (runner.check_optim)."""

    leader_only = True  # every rank raises the same line; the leader says it (worker.py)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer over `model`'s parameters (wrapped or not: DDP, FSDP2)."""
    return _construct(param_groups(model.named_parameters(), cfg), cfg)


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig
) -> list[dict[str, Any]]:
    """One group with optim.weight_decay; with `decay_norms_and_biases: false`, every
    parameter of fewer than 2 dimensions (norm gains, biases; nanoGPT's rule) goes in a second
    group without decay. FSDP2's DTensor parameters report the full tensor's ndim."""
    params = [p for _, p in named]  # frozen ones too, as before: the optimizer skips them
    if cfg.decay_norms_and_biases:
        return [{"params": params}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _construct(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, **cfg.kwargs}
    if cfg.target is not None:
        cls = resolve(cfg.target, "torch.optim", "optim._target_")
        return _call(cls, "optim", groups, **common)
    if cfg.name == "adamw":
        return _call(torch.optim.AdamW, "optim", groups, betas=cfg.betas, **common)
    return _call(torch.optim.SGD, "optim", groups, momentum=cfg.momentum, **common)


def lr_multiplier(cfg: SchedulerConfig, horizon: Callable[[], int]) -> Callable[[int], float]:
    """Step -> factor of optim.lr: linear warmup over `warmup_steps`, then cosine decay to
    `min_lr_ratio` at `horizon()`, constant, or warmup-stable-decay (`wsd`: constant, then a
    cooldown to `min_lr_ratio` over the last `cooldown_steps` before the horizon). Pure, so a
    resumed run recomputes it exactly (and a stable run resumed as `wsd` follows the new
    schedule from its step on); the horizon is read when needed because a resume restores it
    after the scheduler exists."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.name == "constant":
            return 1.0
        end = horizon()
        if cfg.name == "wsd":
            length = cooldown_steps(cfg, end)
            start = end - length
            if step < start:
                return 1.0
            shape = COOLDOWNS[cfg.cooldown_shape](min(1.0, (step - start) / max(1, length)))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# Cooldown shapes: progress through the cooldown (0..1) -> remaining fraction of the LR.
# minus-sqrt is the 1 - sqrt(t) cooldown of Hägele et al. 2024 ("Scaling Laws and
# Compute-Optimal Training Beyond Fixed Training Durations").
COOLDOWNS: dict[str, Callable[[float], float]] = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "minus-sqrt": lambda t: 1.0 - math.sqrt(t),
}


def cooldown_steps(cfg: SchedulerConfig, horizon: int) -> int:
    """`wsd`'s cooldown length: scheduler.cooldown_steps, or cooldown_fraction of the horizon."""
    if cfg.cooldown_steps is not None:
        return min(cfg.cooldown_steps, horizon)
    return round(cfg.cooldown_fraction * horizon)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, horizon: Callable[[], int]
) -> Schedule:
    """`target(optimizer=optimizer, **kwargs)` (a scheduler class or a factory returning one;
    by keyword, so `transformers.get_scheduler` fits too, its `name` in kwargs), else the
    built-in LambdaLR. What it returns is checkpointed through its state_dict."""
    if cfg.target is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, horizon))
    factory = resolve(cfg.target, "torch.optim.lr_scheduler", "scheduler._target_")
    made = _call(factory, "scheduler", optimizer=optimizer, **cfg.kwargs)
    if isinstance(made, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(
            "scheduler._target_: ReduceLROnPlateau steps on a metric, and the loop steps the "
            "schedule once per optimizer step without one; choose a step-based schedule"
        )
    if not all(callable(getattr(made, m, None)) for m in _SCHEDULE_METHODS):
        raise ConfigError(
            f"scheduler._target_: {cfg.target} returned a {type(made).__name__}, not a scheduler "
            f"(it needs {', '.join(_SCHEDULE_METHODS)}); give an LRScheduler class or factory"
        )
    return made


_SCHEDULE_METHODS = ("step", "get_last_lr", "state_dict", "load_state_dict")


def check_targets(optim: OptimConfig, scheduler: SchedulerConfig) -> None:
    """Build the optimizer and scheduler the config names on a throwaway parameter: a bad
    import path, class or keyword raises its one-line ConfigError here, before training."""
    if optim.target is None and scheduler.target is None and not optim.kwargs:
        return
    probe = torch.nn.Linear(1, 1)
    build_scheduler(build_optimizer(probe, optim), scheduler, lambda: 1)


def resolve(path: str, home: str, key: str) -> Any:
    """`Name` (in module `home`), `pkg.mod.Name` or `pkg.mod:Name` -> the object."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
        module_name = module_name or home
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"{key}: cannot import {path!r} ({exc}); give a class name in {home} or an "
            "import path like 'package.module:Class'"
        ) from None
    if not callable(found):
        raise ConfigError(f"{key}: {path!r} is not a class or function")
    return found


def _call(factory: Any, section: str, *args: Any, **kwargs: Any) -> Any:
    """`factory(*args, **kwargs)`; a wrong keyword or value becomes one ConfigError."""
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        name = getattr(factory, "__qualname__", repr(factory))
        text = " ".join(str(exc).split())
        raise ConfigError(
            f"{section}: {name}(...) refused its arguments ({text}); fix {section}.kwargs"
        ) from None
