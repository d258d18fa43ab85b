"""Optimizer and learning-rate schedule from the config (AdamW/SGD; warmup + cosine/constant)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from orchestrator.config import OptimConfig, SchedulerConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig
) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_multiplier(cfg: SchedulerConfig, horizon: Callable[[], int]) -> Callable[[int], float]:
    """Step -> factor of optim.lr: linear warmup over `warmup_steps`, then cosine decay to
    `min_lr_ratio` at `horizon()` (or constant). Pure, so a resumed run recomputes it exactly;
    the horizon is read when needed because a resume restores it after the scheduler exists."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon() - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, horizon: Callable[[], int]
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, horizon))
