"""Window weights (orchestrator/soup/schedules.py): pure, against hand-computed cases and against
the property the decay rules are built on (WSM: the merge scales step k's gradient by the weight
of the checkpoints after k), checked by numerical integration, not by the closed forms."""

from __future__ import annotations

import math
import random
from itertools import pairwise

import pytest

from orchestrator.errors import UsageError
from orchestrator.soup.engine import normalised
from orchestrator.soup.schedules import RULES, window_weights

SHAPES = {
    "decay:linear": lambda t: 1 - t,
    "decay:cosine": lambda t: (1 + math.cos(math.pi * t)) / 2,
    "decay:minus-sqrt": lambda t: 1 - math.sqrt(t),
}
R3 = math.sqrt(3)
# steps 0, 10, 30: each checkpoint covers 10, 10, 20 steps; t = 0, 1/3, 1
UNEVEN = {
    "uniform": [1 / 4, 1 / 4, 1 / 2],
    "linear": [1 / 11, 2 / 11, 8 / 11],  # d_i (s_i + 10): 100, 200, 800
    "decay:linear": [1 / 6, 1 / 2, 1 / 3],  # means of 1 - t: 5/6, 1/3
    "decay:cosine": [
        1 / 2 - 3 * R3 / (4 * math.pi),
        9 * R3 / (8 * math.pi),
        1 / 2 - 3 * R3 / (8 * math.pi),
    ],
    "decay:minus-sqrt": [2 / (3 * R3), 1 - 1 / R3, 1 / (3 * R3)],  # means 1 - 2/(3 R3), 1/(3 R3)
}


@pytest.mark.parametrize("rule", sorted(UNEVEN))
def test_uneven_steps_by_hand(rule: str) -> None:
    got = window_weights([0, 10, 30], rule)
    assert got.weights == pytest.approx(UNEVEN[rule], abs=1e-15)
    assert got.covers == [(-10, 0), (0, 10), (10, 30)]


def test_even_spacing() -> None:
    steps = [100, 200, 300, 400, 500]
    assert window_weights(steps, "uniform").weights == [0.2] * 5  # exactly the uniform soup's
    assert window_weights(steps, "linear").weights == pytest.approx([k / 15 for k in range(1, 6)])
    # decay:linear is the trapezoid rule: the endpoints weigh half
    assert window_weights(steps, "decay:linear").weights == pytest.approx(
        [w / 8 for w in (1, 2, 2, 2, 1)]
    )


def test_dense_tail_is_not_overweighted() -> None:
    """Every 100 steps, then every 10: the tail's ten checkpoints weigh what its 100 steps do."""
    steps = [0, 100, 200, *range(210, 301, 10)]
    w = dict(zip(steps, window_weights(steps, "uniform").weights, strict=True))
    assert w[100] == pytest.approx(100 / 400) and w[250] == pytest.approx(10 / 400)
    assert sum(w[s] for s in range(210, 301, 10)) == pytest.approx(w[200])


@pytest.mark.parametrize("rule", [r.replace("<beta>", "0.9") for r in RULES])
def test_weights_sum_to_exactly_one_and_follow_the_given_order(rule: str) -> None:
    rng = random.Random(rule)
    for _ in range(50):
        steps = rng.sample(range(1, 5000), rng.randint(2, 12))
        got, ordered = window_weights(steps, rule), window_weights(sorted(steps), rule)
        # in step order, as the mixer adds them: exactly 1.0, so it uses them as they are
        assert sum(ordered.weights) == 1.0 and min(ordered.weights) > 0
        assert normalised(ordered.weights, len(steps)) == ordered.weights
        assert dict(zip(got.steps, got.weights, strict=True)) == dict(
            zip(ordered.steps, ordered.weights, strict=True)
        )


@pytest.mark.parametrize("rule", sorted(SHAPES))
def test_decay_weights_scale_each_interval_by_the_shapes_mean(rule: str) -> None:
    """alpha(k) = sum of c_i over s_i > k is 1 before the window, then alpha's mean over each
    interval between checkpoints (midpoint rule, 20000 points), then 0."""
    steps = [7, 19, 20, 64, 100, 101, 250]
    got = window_weights(steps, rule)
    shape, span = SHAPES[rule], steps[-1] - steps[0]
    assert math.fsum(got.weights) == pytest.approx(1.0)  # alpha before s_1
    for j, (a, b) in enumerate(pairwise(steps)):
        after = math.fsum(got.weights[j + 1 :])
        n = 20000
        mean = sum(shape((a + (b - a) * (m + 0.5) / n - steps[0]) / span) for m in range(n)) / n
        assert after == pytest.approx(mean, abs=1e-6), (a, b)


def test_minus_sqrt_is_an_alias() -> None:
    got = window_weights([0, 10, 30], "minus-sqrt")
    assert got.rule == "decay:minus-sqrt"
    assert got.weights == window_weights([0, 10, 30], "decay:minus-sqrt").weights
    assert "1 - sqrt(t)" in got.formula


@pytest.mark.parametrize(
    ("steps", "rule", "message"),
    [
        ([10], "uniform", "needs at least 2 checkpoints (got 1)"),
        ([10, 20], "cosine", "unknown window rule 'cosine'; use one of uniform, linear, decay:"),
        ([10, 20, 10], "uniform", "step 10 appears twice"),
        ([10, None], "linear", "ingredient 2 has no step (a .safetensors file)"),
        ([10, 20], "ema:1", "the EMA decay must be a number in (0, 1), e.g. ema:0.999"),
        ([10, 20], "ema:x", "the EMA decay must be a number in (0, 1)"),
    ],
)
def test_errors_say_what_to_do(steps: list[int | None], rule: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        window_weights(steps, rule)
    assert "\n" not in str(e.value)


def test_ema_rule_is_the_ema_of_the_steps_each_checkpoint_stands_for() -> None:
    """ema:beta at s_n, step by step: step k counts as the checkpoint covering it (the first
    one after k), beta^(s_n - k) each, the mass before the window dropped."""
    steps, beta = [10, 20, 30, 40, 45, 50], 0.95
    brute = [0.0] * len(steps)
    for k in range(1, 51):
        brute[next(i for i, s in enumerate(steps) if s >= k)] += beta ** (50 - k)
    got = window_weights(steps, f"ema:{beta}")
    assert got.weights == pytest.approx([b / sum(brute) for b in brute], rel=1e-12)
    assert "beta = 0.95" in got.formula and math.fsum(got.weights) == pytest.approx(1.0)
