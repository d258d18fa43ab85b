"""Retention: property tests for the pure planner, examples, validation, and the thin deleter."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import config
from orchestrator.checkpoint.format import step_dirname
from orchestrator.checkpoint.retention import (
    Candidate,
    KeepBest,
    RetentionPolicy,
    delete_checkpoints,
    plan,
    plan_retention,
)
from orchestrator.errors import ConfigError, StorageError

METRIC = "loss"

# --- strategies ---------------------------------------------------------------------------------

metric_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
    st.sampled_from([0.0, 1.0, 2.0]),  # small pool so ties are common
    st.just(math.nan),
)


@st.composite
def candidates(draw: st.DrawFn, max_size: int = 30) -> list[Candidate]:
    steps = draw(st.lists(st.integers(0, 5000), unique=True, max_size=max_size))
    out = []
    for step in steps:
        metrics = draw(st.dictionaries(st.sampled_from([METRIC, "acc"]), metric_values))
        out.append(Candidate(step=step, metrics=metrics))
    return out


def keep_if_from(keep_steps: frozenset[int]) -> Callable[[Candidate], bool]:
    return lambda c: c.step in keep_steps


policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(1, 10),
    keep_best=st.none()
    | st.builds(
        KeepBest, metric=st.just(METRIC), mode=st.sampled_from(["min", "max"]), k=st.integers(1, 5)
    ),
    keep_every_steps=st.none() | st.integers(1, 500),
    keep_if=st.none() | st.frozensets(st.integers(0, 5000)).map(keep_if_from),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Candidate], RetentionPolicy, set[int]]:
    committed = draw(candidates())
    steps = [c.step for c in committed]
    protected = set(draw(st.lists(st.sampled_from(steps)) if steps else st.just([])))
    protected |= draw(st.sets(st.integers(0, 5000), max_size=3))  # may name uncommitted steps
    return committed, draw(policies), protected


def valid_metric(c: Candidate) -> bool:
    return METRIC in c.metrics and not math.isnan(c.metrics[METRIC])


def beats(a: Candidate, b: Candidate, mode: str) -> bool:
    """a ranks above b: strictly better metric, or equal metric and later step (documented tie)."""
    va, vb = a.metrics[METRIC], b.metrics[METRIC]
    better = va < vb if mode == "min" else va > vb
    return better or (va == vb and a.step > b.step)


def single_rule_policies(policy: RetentionPolicy) -> list[RetentionPolicy]:
    fields = ("keep_last", "keep_best", "keep_every_steps", "keep_if")
    return [
        RetentionPolicy(**{f: getattr(policy, f)}) for f in fields if getattr(policy, f) is not None
    ]


# --- properties ---------------------------------------------------------------------------------


@given(scenarios())
def test_output_is_sorted_unique_subset_of_input(scenario) -> None:
    committed, policy, protected = scenario
    result = plan_retention(committed, policy, protected=protected)
    assert result == sorted(set(result))
    assert set(result) <= {c.step for c in committed}


@given(scenarios())
def test_never_deletes_newest_or_protected(scenario) -> None:
    committed, policy, protected = scenario
    result = set(plan_retention(committed, policy, protected=protected))
    if committed:
        assert max(c.step for c in committed) not in result
    assert not result & protected


@given(scenarios())
def test_keep_last_keeps_newest_n(scenario) -> None:
    committed, policy, protected = scenario
    if policy.keep_last is None:
        return
    result = set(plan_retention(committed, policy, protected=protected))
    newest = sorted((c.step for c in committed), reverse=True)[: policy.keep_last]
    assert not result & set(newest)


@given(scenarios())
def test_keep_best_keeps_k_best_later_step_wins_ties(scenario) -> None:
    committed, policy, protected = scenario
    rule = policy.keep_best
    if rule is None:
        return
    result = set(plan_retention(committed, policy, protected=protected))
    ranked = [c for c in committed if valid_metric(c)]
    for c in ranked:
        if c.step in result:  # deleted: at least k candidates must rank above it
            assert sum(beats(o, c, rule.mode) for o in ranked) >= rule.k


@given(candidates(), st.integers(1, 10))
def test_keep_last_alone_deletes_exactly_the_older(committed, n) -> None:
    steps = sorted(c.step for c in committed)
    assert plan_retention(committed, RetentionPolicy(keep_last=n)) == steps[:-n]


@given(candidates(), st.sampled_from(["min", "max"]), st.integers(1, 5))
def test_keep_best_alone_deletes_exactly_the_rest(committed, mode, k) -> None:
    """Alone, keep_best keeps the newest plus the k top-ranked (ties: the later step ranks higher)."""
    newest = max((c.step for c in committed), default=None)
    ranked = [c for c in committed if valid_metric(c)]
    kept = {c.step for c in ranked if sum(beats(o, c, mode) for o in ranked) < k} | {newest}
    expected = sorted(c.step for c in committed if c.step not in kept)
    assert (
        plan_retention(committed, RetentionPolicy(keep_best=KeepBest(METRIC, mode, k))) == expected
    )


@given(candidates(), st.sampled_from(["min", "max"]), st.integers(1, 5))
def test_missing_or_nan_metric_never_protects(committed, mode, k) -> None:
    policy = RetentionPolicy(keep_best=KeepBest(METRIC, mode, k))
    result = set(plan_retention(committed, policy))
    newest = max((c.step for c in committed), default=None)
    for c in committed:
        if not valid_metric(c) and c.step != newest:
            assert c.step in result


@given(scenarios())
def test_milestones_kept(scenario) -> None:
    committed, policy, protected = scenario
    if policy.keep_every_steps is None:
        return
    result = plan_retention(committed, policy, protected=protected)
    assert all(step % policy.keep_every_steps != 0 for step in result)


@given(scenarios())
def test_keep_if_true_never_deleted(scenario) -> None:
    committed, policy, protected = scenario
    if policy.keep_if is None:
        return
    result = set(plan_retention(committed, policy, protected=protected))
    assert not any(policy.keep_if(c) for c in committed if c.step in result)


@given(candidates(), st.sets(st.integers(0, 5000)))
def test_no_rules_deletes_nothing(committed, protected) -> None:
    assert plan_retention(committed, RetentionPolicy(), protected=protected) == []


@given(policies, st.sets(st.integers(0, 5000)))
def test_empty_input_deletes_nothing(policy, protected) -> None:
    assert plan_retention([], policy, protected=protected) == []


@given(scenarios(), st.randoms())
def test_deterministic_and_order_independent(scenario, rnd) -> None:
    committed, policy, protected = scenario
    first = plan_retention(committed, policy, protected=protected)
    shuffled = list(committed)
    rnd.shuffle(shuffled)
    assert plan_retention(committed, policy, protected=protected) == first
    assert plan_retention(shuffled, policy, protected=protected) == first


@given(scenarios())
def test_idempotent_over_survivors(scenario) -> None:
    committed, policy, protected = scenario
    deleted = set(plan_retention(committed, policy, protected=protected))
    survivors = [c for c in committed if c.step not in deleted]
    assert plan_retention(survivors, policy, protected=protected) == []


@given(scenarios())
def test_rules_union_their_keeps(scenario) -> None:
    """Deleted under all rules == deleted under every single rule alone (keeps are a union)."""
    committed, policy, protected = scenario
    singles = single_rule_policies(policy)
    if not singles:
        return
    expected = set.intersection(
        *(set(plan_retention(committed, p, protected=protected)) for p in singles)
    )
    assert plan_retention(committed, policy, protected=protected) == sorted(expected)


# --- examples -----------------------------------------------------------------------------------


def cands(*pairs: tuple[int, float | None]) -> list[Candidate]:
    return [Candidate(s, {} if v is None else {METRIC: v}) for s, v in pairs]


def test_keep_last_example() -> None:
    committed = cands((10, None), (20, None), (30, None), (40, None))
    assert plan_retention(committed, RetentionPolicy(keep_last=2)) == [10, 20]


def test_keep_last_one_still_keeps_protected() -> None:
    committed = cands((10, None), (20, None), (30, None))
    assert plan_retention(committed, RetentionPolicy(keep_last=1), protected={10}) == [20]


def test_keep_best_min_and_max() -> None:
    committed = cands((10, 0.5), (20, 0.1), (30, 0.9), (40, 0.7))
    assert plan_retention(committed, RetentionPolicy(keep_best=KeepBest(METRIC))) == [10, 30]
    best_max = RetentionPolicy(keep_best=KeepBest(METRIC, mode="max"))
    assert plan_retention(committed, best_max) == [10, 20]


def test_keep_best_tie_later_step_wins() -> None:
    committed = cands((10, 0.1), (20, 0.1), (30, 0.1), (40, 0.9))
    policy = RetentionPolicy(keep_best=KeepBest(METRIC, k=1))
    assert plan_retention(committed, policy) == [10, 20]


def test_keep_best_nan_and_missing_never_best() -> None:
    committed = cands((10, math.nan), (20, None), (30, 5.0), (40, 9.0))
    policy = RetentionPolicy(keep_best=KeepBest(METRIC, k=3))
    assert plan_retention(committed, policy) == [10, 20]


def test_keep_every_steps_and_keep_if() -> None:
    committed = cands(*((s, None) for s in range(100, 1100, 100)))
    policy = RetentionPolicy(keep_every_steps=500, keep_if=lambda c: c.step == 300)
    assert plan_retention(committed, policy) == [100, 200, 400, 600, 700, 800, 900]


def test_keep_weights_improved_thins_the_improving_checkpoints_and_deletes_the_rest() -> None:
    """The checkpoint-soup rule: the weights of each checkpoint that beat every earlier one on
    eval/loss (down) or eval/accuracy (up); a checkpoint with neither metric never counts."""
    rows = [(10, 0.9, 0.50), (20, 0.8, 0.49), (30, 0.85, 0.55), (40, 0.86, 0.54),
            (50, None, None), (60, 0.7, 0.60), (70, 0.75, 0.58)]  # fmt: skip
    committed = [
        Candidate(s, {} if loss is None else {"eval/loss": loss, "eval/accuracy": acc})
        for s, loss, acc in rows
    ]
    policy = RetentionPolicy(keep_last=1, keep_weights_improved=("eval/loss", "eval/accuracy"))
    got = plan(committed, policy)
    assert got.drop_optimizer == [10, 20, 30, 60]  # 70 is the newest: kept whole
    assert got.delete == [40, 50]
    # weights already dropped are not thinned twice
    thinned = [dataclasses.replace(c, weights_only=c.step == 20) for c in committed]
    assert plan(thinned, policy).drop_optimizer == [10, 30, 60]


@pytest.mark.parametrize("bad", [(), ("",), ("eval/loss", 3)])
def test_keep_weights_improved_needs_metric_names(bad: tuple) -> None:
    with pytest.raises(ValueError, match="keep_weights_improved must list metric names"):
        RetentionPolicy(keep_weights_improved=bad)


def test_step_dirname() -> None:
    assert step_dirname(1000) == "step-000001000"
    assert step_dirname(0) == "step-000000000"
    with pytest.raises(ValueError):
        step_dirname(-1)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": 0}, r"keep_last must be an integer >= 1 \(got 0\); use null"),
        ({"keep_last": -3}, r"keep_last .*got -3"),
        ({"keep_last": True}, r"keep_last .*got True"),
        ({"keep_last": 1.5}, r"keep_last .*got 1.5"),
        ({"keep_every_steps": 0}, r"keep_every_steps must be an integer >= 1 \(got 0\)"),
        ({"keep_if": 3}, r"keep_if must be callable \(got int\)"),
    ],
)
def test_policy_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetentionPolicy(**kwargs)


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
    """KeepBest is also the config's `checkpoint.keep_best`: its errors are one-line ConfigErrors."""
    with pytest.raises(ConfigError, match=match):
        KeepBest(**kwargs)


def test_keep_best_without_a_metric_is_off() -> None:
    """The config's default (`metric: null`) keeps nothing extra, alone or beside other rules."""
    committed = [Candidate(step=s, metrics={METRIC: float(s)}) for s in (10, 20, 30, 40)]
    off = KeepBest()
    assert not RetentionPolicy(keep_best=off).has_rules
    assert plan_retention(committed, RetentionPolicy(keep_best=off)) == []
    with_last = RetentionPolicy(keep_last=1, keep_best=off)
    assert plan_retention(committed, with_last) == [10, 20, 30]
    on = RetentionPolicy(keep_last=1, keep_best=KeepBest(METRIC, "min", 1))
    assert plan_retention(committed, on) == [20, 30]


def test_config_keep_best_is_the_retention_rule() -> None:
    """One type: what the config loads is what the planner applies, no copy in between."""
    cfg = config.load(None, ["checkpoint.keep_best.metric=eval/loss", "checkpoint.keep_best.k=2"])
    assert cfg.checkpoint.keep_best == KeepBest("eval/loss", "min", 2)
    with pytest.raises(ConfigError, match=r"^checkpoint.keep_best.k must be >= 1 \(got 0\)$"):
        config.load(None, ["checkpoint.keep_best.k=0"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best.mode must be one of min, max"):
        config.load(None, ["checkpoint.keep_best.mode=median"])


# --- the deleter --------------------------------------------------------------------------------


class FakeStore:
    """Records deletes; raises `error` for the paths in `fail` (a pure-logic stand-in)."""

    def __init__(self, fail: Collection[str] = frozenset(), error: Exception | None = None) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.fail = fail
        self.error = error or OSError("disk on fire")

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        self.calls.append((rel, recursive))
        if rel in self.fail:
            raise self.error


def manifest(step: int) -> str:
    return f"checkpoints/{step_dirname(step)}/MANIFEST.json"


def directory(step: int) -> str:
    return f"checkpoints/{step_dirname(step)}"


def test_deleter_removes_manifest_before_directory() -> None:
    store = FakeStore()
    assert delete_checkpoints(store, [10, 20]) == [10, 20]
    assert store.calls == [
        ("checkpoints/step-000000010/MANIFEST.json", False),
        ("checkpoints/step-000000010", True),
        ("checkpoints/step-000000020/MANIFEST.json", False),
        ("checkpoints/step-000000020", True),
    ]


def test_failed_manifest_delete_is_logged_and_skips_only_that_step(caplog) -> None:
    store = FakeStore(fail={manifest(20)})
    with caplog.at_level(logging.WARNING):
        assert delete_checkpoints(store, [10, 20, 30]) == [10, 30]
    assert (directory(20), True) not in store.calls  # still committed, intact: retried next plan
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert manifest(20) in caplog.text and "disk on fire" in caplog.text


def test_failed_directory_delete_is_logged_and_not_reported(caplog) -> None:
    store = FakeStore(fail={directory(10)}, error=StorageError("throttled"))
    with caplog.at_level(logging.WARNING):
        assert delete_checkpoints(store, [10, 20]) == [20]
    assert store.calls.index((manifest(10), False)) < store.calls.index((directory(10), True))
    assert "throttled" in caplog.text


def test_deleter_uses_given_logger_and_handles_empty(caplog) -> None:
    assert delete_checkpoints(FakeStore(), []) == []
    log = logging.getLogger("test.retention.custom")
    with caplog.at_level(logging.WARNING, logger=log.name):
        delete_checkpoints(FakeStore(fail={manifest(1)}), [1], log=log)
    assert [r.name for r in caplog.records] == [log.name]


def test_deleter_refuses_negative_step() -> None:
    with pytest.raises(ValueError):
        delete_checkpoints(FakeStore(), [-1])


@given(
    st.lists(st.integers(0, 10**9 - 1), max_size=20),
    st.sets(st.integers(0, 10**9 - 1), max_size=5),
    st.booleans(),
)
def test_deleter_properties(steps, failing, fail_manifest) -> None:
    failing |= set(steps[:2])
    paths = {manifest(s) if fail_manifest else directory(s) for s in failing}
    store = FakeStore(fail=paths)
    deleted = delete_checkpoints(store, steps)
    assert deleted == [s for s in dict.fromkeys(steps) if s not in failing]
    assert all(rel.startswith("checkpoints/step-") for rel, _ in store.calls)
    for step in deleted:  # manifest strictly before the directory, each exactly once
        assert store.calls.index((manifest(step), False)) < store.calls.index(
            (directory(step), True)
        )
