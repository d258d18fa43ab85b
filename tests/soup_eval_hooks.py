"""Evaluation hooks for tests/test_soup_eval.py (`--eval-hook tests.soup_eval_hooks:NAME`)."""

from __future__ import annotations

import torch

TARGET = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 8


def distance(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far the soup's `w` is from TARGET."""
    return {"eval/error": float((state["w"] - TARGET).norm())}


def broken(state: dict[str, torch.Tensor]) -> list[float]:
    return [0.0]


def raises(state: dict[str, torch.Tensor]) -> dict[str, float]:
    raise RuntimeError("no GPU here")


CALLS: list[str] = []


def counted(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """A stand-in score under the task's own metric name; counts its calls."""
    CALLS.append("call")
    return {"eval/accuracy": float(sum(v.double().abs().sum() for v in state.values()))}
