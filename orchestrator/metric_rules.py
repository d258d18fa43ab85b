"""Pure rules over checkpoints' held-out metrics, shared by retention and soup selection.

A candidate is anything with a `step` and a `metrics` mapping (a metric may be missing or NaN:
such a value never counts). Which way a metric improves is its `mode`, or, by default, read
from its name: losses and error rates go down, everything else up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeGuard, TypeVar

_MIN_WORDS = ("loss", "error", "err", "perplexity", "ppl")


class Scored(Protocol):
    @property
    def step(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...


S = TypeVar("S", bound=Scored)


def metric_mode(metric: str, mode: str | None) -> str:
    """`mode`, or the usual direction of `metric`: min for losses and error rates, else max."""
    if mode is not None:
        return mode
    name = metric.rsplit("/", 1)[-1].lower()
    return "min" if any(word in name for word in _MIN_WORDS) else "max"


def finite(value: float | None) -> TypeGuard[float]:
    """A metric value that counts: present and neither NaN nor infinite."""
    return value is not None and math.isfinite(value)


def improved_any(cands: Sequence[S], metrics: Sequence[str]) -> list[S]:
    """In step order, the candidates that beat every earlier one on at least one metric (the
    first one with a value counts as an improvement): BirdCLEF 2024's checkpoint-soup rule."""
    best: dict[str, float] = {}
    kept = []
    for cand in sorted(cands, key=lambda c: c.step):
        improved = False
        for metric in metrics:
            value = cand.metrics.get(metric)
            if not finite(value):
                continue
            sign = 1 if metric_mode(metric, None) == "min" else -1
            if metric not in best or sign * value < sign * best[metric]:
                best[metric] = value
                improved = True
        if improved:
            kept.append(cand)
    return kept
