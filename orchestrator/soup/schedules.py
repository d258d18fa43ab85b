"""Window weights: how much each checkpoint of a pretraining window weighs in its merge.

Steps s_1 < ... < s_n; checkpoint i covers the d_i = s_i - s_(i-1) steps before it (the first
covers d_1 = s_2 - s_1), so uneven spacing (every 100 steps, then every 10) weighs by the
steps covered, not by how many checkpoints there are.

    uniform            w_i ~ d_i
    linear             w_i ~ d_i (s_i - a), a = s_1 - d_1: later checkpoints heavier (LAWA)
    decay:<shape>      the merge that emulates an LR cooldown of that shape over [s_1, s_n]
    ema:<beta>         a post-hoc EMA at s_n from the saved checkpoints: checkpoint i stands for
                       the d_i steps it covers, w_i ~ beta^(s_n - s_i) (1 - beta^d_i), the
                       EMA's mass before the window dropped (renormalised)

The decay rules follow WSM (arXiv 2507.17634): with theta_(k+1) = theta_k - lr g_k, the merge
sum_i c_i theta_i equals training whose step-k gradient is scaled by alpha(k) = sum of c_i
over s_i > k. For a shape alpha(t), t = (s - s_1) / (s_n - s_1), let m_j be alpha's mean over
[s_j, s_(j+1)] (closed-form integrals, so uneven spacing is exact), alpha = 1 before the window
and 0 after it: c_1 = 1 - m_1, c_j = m_(j-1) - m_j, c_n = m_(n-1). The merge's scale is then m_j
on interval j: the cooldown averaged over each interval between checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from orchestrator.errors import UsageError

# alpha(t)'s antiderivative A(t) on [0, 1] (A(0) = 0): the mean over [t0, t1] is a difference.
_SHAPES: dict[str, tuple[str, Callable[[float], float]]] = {
    "linear": ("1 - t", lambda t: t - t * t / 2),
    "cosine": ("(1 + cos(pi t)) / 2", lambda t: t / 2 + math.sin(math.pi * t) / (2 * math.pi)),
    "minus-sqrt": ("1 - sqrt(t)", lambda t: t - 2 / 3 * t**1.5),
}
ALIASES = {"minus-sqrt": "decay:minus-sqrt"}
RULES = ("uniform", "linear", *(f"decay:{s}" for s in _SHAPES), *ALIASES, "ema:<beta>")

_SPAN = "d_i = s_i - s_(i-1), d_1 = s_2 - s_1"
_DECAY = (
    "c_1 = 1 - m_1, c_j = m_(j-1) - m_j, c_n = m_(n-1); m_j = mean of alpha(t) = {shape} over "
    "[s_j, s_(j+1)], t = (s - s_1) / (s_n - s_1) (WSM: the merge scales step k's gradient by "
    "the weight of the checkpoints after k)"
)


@dataclass(frozen=True)
class Window:
    """A window merge's weights, in the order of the steps given."""

    rule: str  # canonical: an alias resolved
    formula: str
    steps: list[int]
    weights: list[float]  # > 0; in step order their float sum is exactly 1.0 (see _exact_sum)
    covers: list[tuple[int, int]]  # checkpoint i stands for steps (start, end]


def window_weights(steps: Sequence[int | None], rule: str) -> Window:
    """Normalised weights for checkpoints at `steps` (any order) under `rule`."""
    rule = ALIASES.get(rule, rule)
    beta = _ema_beta(rule) if rule.startswith("ema:") else None
    if rule not in RULES and beta is None:
        raise UsageError(f"unknown window rule {rule!r}; use one of {', '.join(RULES)}")
    ordered = _checked(steps)
    spans = [ordered[1] - ordered[0]] + [b - a for a, b in pairwise(ordered)]
    if beta is not None:
        last = ordered[-1]
        raw = [
            beta ** (last - s) * -math.expm1(d * math.log(beta))
            for s, d in zip(ordered, spans, strict=True)
        ]
        formula = f"w_i ~ beta^(s_n - s_i) (1 - beta^d_i), beta = {beta!r}; {_SPAN}"
    elif rule == "uniform":
        raw, formula = [float(d) for d in spans], f"w_i ~ d_i; {_SPAN}"
    elif rule == "linear":
        start = ordered[0] - spans[0]
        raw = [float(d * (s - start)) for d, s in zip(spans, ordered, strict=True)]
        formula = f"w_i ~ d_i (s_i - a), a = s_1 - d_1; {_SPAN}"
    else:
        shape, antiderivative = _SHAPES[rule.removeprefix("decay:")]
        raw, formula = _decay(ordered, antiderivative), _DECAY.format(shape=shape)
    by_step = dict(zip(ordered, _exact_sum(raw), strict=True))
    covers = {s: (s - d, s) for s, d in zip(ordered, spans, strict=True)}
    given = [int(s) for s in steps if s is not None]
    return Window(rule, formula, given, [by_step[s] for s in given], [covers[s] for s in given])


def rule_problem(rule: str) -> str | None:
    """Why `rule` is not a window rule (one line), or None: for validating configs."""
    try:
        window_weights([0, 1], rule)
    except UsageError as exc:
        return str(exc)
    return None


def _ema_beta(rule: str) -> float:
    """The decay of an `ema:<beta>` rule; UsageError unless 0 < beta < 1."""
    text = rule.partition(":")[2]
    try:
        beta = float(text)
    except ValueError:
        beta = math.nan
    if not 0 < beta < 1:
        raise UsageError(
            f"window rule {rule!r}: the EMA decay must be a number in (0, 1), e.g. ema:0.999"
        )
    return beta


def _checked(steps: Sequence[int | None]) -> list[int]:
    """The steps in order; UsageError for too few, a missing step, or a repeat."""
    if len(steps) < 2:
        raise UsageError(
            f"a window merge needs at least 2 checkpoints (got {len(steps)}); widen --steps"
        )
    missing = [k + 1 for k, s in enumerate(steps) if s is None]
    if missing:
        raise UsageError(
            f"ingredient {missing[0]} has no step (a .safetensors file); a window merge weighs "
            "checkpoints by step: name a run dir or its committed checkpoints"
        )
    ordered = sorted(int(s) for s in steps if s is not None)
    repeats = sorted({a for a, b in pairwise(ordered) if a == b})
    if repeats:
        raise UsageError(
            f"step {repeats[0]} appears twice: a window merge is over one run's checkpoints; "
            "name one run (ingredients of several runs: --recipe uniform or weighted)"
        )
    return ordered


def _decay(steps: list[int], antiderivative: Callable[[float], float]) -> list[float]:
    span = steps[-1] - steps[0]
    t = [(s - steps[0]) / span for s in steps]
    means = [(antiderivative(b) - antiderivative(a)) / (b - a) for a, b in pairwise(t)]
    return [1 - means[0], *(a - b for a, b in pairwise(means)), means[-1]]


def _exact_sum(raw: list[float]) -> list[float]:
    """`raw` normalised so that the float sum (left to right, as engine.normalised adds) is
    exactly 1.0: then the mixer's own normalisation leaves every weight as recorded. Equal
    weights stay 1/n each (the mixer's uniform path); otherwise the last absorbs the rounding
    (exact when the others sum to >= 0.5, Sterbenz; within 2^-54 of 1, so 1.0, otherwise)."""
    n = len(raw)
    if len(set(raw)) == 1:
        return [1.0 / n] * n
    total = math.fsum(raw)
    weights = [w / total for w in raw[:-1]]
    return [*weights, 1.0 - sum(weights)]
