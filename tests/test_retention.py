"""Retention: property tests for the pure planner, examples, and the thin deleter. (The rules'
validation is the config's: tests/test_config_checkpoint.py.)"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.checkpoint.format import step_dirname
from orchestrator.checkpoint.retention import (
    NO_HOOKS,
    Candidate,
    RetentionHooks,
    delete_checkpoints,
    plan_retention,
)
from orchestrator.config.checkpoint import KeepBest, RetentionPolicy
from orchestrator.errors import StorageError

METRIC = "loss"
OFF = RetentionPolicy(keep_last=None)  # every rule off: deletes nothing

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
    keep_best=st.just(KeepBest())  # metric null: off
    | st.builds(
        KeepBest, metric=st.just(METRIC), mode=st.sampled_from(["min", "max"]), k=st.integers(1, 5)
    ),
    keep_every_steps=st.none() | st.integers(1, 500),
)
hook_sets = st.builds(
    RetentionHooks, keep_if=st.none() | st.frozensets(st.integers(0, 5000)).map(keep_if_from)
)

Scenario = tuple[list[Candidate], RetentionPolicy, RetentionHooks, set[int]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    committed = draw(candidates())
    steps = [c.step for c in committed]
    protected = set(draw(st.lists(st.sampled_from(steps)) if steps else st.just([])))
    protected |= draw(st.sets(st.integers(0, 5000), max_size=3))  # may name uncommitted steps
    return committed, draw(policies), draw(hook_sets), protected


def to_delete(
    committed: Sequence[Candidate],
    policy: RetentionPolicy,
    hooks: RetentionHooks = NO_HOOKS,
    protected: Collection[int] = (),
) -> list[int]:
    return plan_retention(committed, policy, protected=protected, hooks=hooks).delete


def best_only(rule: KeepBest) -> RetentionPolicy:
    return dataclasses.replace(OFF, keep_best=rule)


def valid_metric(c: Candidate) -> bool:
    return METRIC in c.metrics and not math.isnan(c.metrics[METRIC])


def beats(a: Candidate, b: Candidate, mode: str) -> bool:
    """a ranks above b: strictly better metric, or equal metric and later step (documented tie)."""
    va, vb = a.metrics[METRIC], b.metrics[METRIC]
    better = va < vb if mode == "min" else va > vb
    return better or (va == vb and a.step > b.step)


def single_rules(
    policy: RetentionPolicy, hooks: RetentionHooks
) -> list[tuple[RetentionPolicy, RetentionHooks]]:
    """Each rule that is on, alone (the others off)."""
    singles = [
        (dataclasses.replace(OFF, **{f: getattr(policy, f)}), NO_HOOKS)
        for f in ("keep_last", "keep_every_steps")
        if getattr(policy, f) is not None
    ]
    if policy.keep_best.metric is not None:
        singles.append((dataclasses.replace(OFF, keep_best=policy.keep_best), NO_HOOKS))
    if hooks.keep_if is not None:
        singles.append((OFF, hooks))
    return singles


# --- properties ---------------------------------------------------------------------------------


@given(scenarios())
def test_output_is_sorted_unique_subset_of_input(scenario) -> None:
    committed, policy, hooks, protected = scenario
    result = to_delete(committed, policy, hooks, protected)
    assert result == sorted(set(result))
    assert set(result) <= {c.step for c in committed}


@given(scenarios())
def test_never_deletes_newest_or_protected(scenario) -> None:
    committed, policy, hooks, protected = scenario
    result = set(to_delete(committed, policy, hooks, protected))
    if committed:
        assert max(c.step for c in committed) not in result
    assert not result & protected


@given(scenarios())
def test_keep_last_keeps_newest_n(scenario) -> None:
    committed, policy, hooks, protected = scenario
    if policy.keep_last is None:
        return
    result = set(to_delete(committed, policy, hooks, protected))
    newest = sorted((c.step for c in committed), reverse=True)[: policy.keep_last]
    assert not result & set(newest)


@given(scenarios())
def test_keep_best_keeps_k_best_later_step_wins_ties(scenario) -> None:
    committed, policy, hooks, protected = scenario
    rule = policy.keep_best
    if rule.metric is None:
        return
    result = set(to_delete(committed, policy, hooks, protected))
    ranked = [c for c in committed if valid_metric(c)]
    for c in ranked:
        if c.step in result:  # deleted: at least k candidates must rank above it
            assert sum(beats(o, c, rule.mode) for o in ranked) >= rule.k


@given(candidates(), st.integers(1, 10))
def test_keep_last_alone_deletes_exactly_the_older(committed, n) -> None:
    steps = sorted(c.step for c in committed)
    assert to_delete(committed, RetentionPolicy(keep_last=n)) == steps[:-n]


@given(candidates(), st.sampled_from(["min", "max"]), st.integers(1, 5))
def test_keep_best_alone_deletes_exactly_the_rest(committed, mode, k) -> None:
    """Alone, keep_best keeps the newest plus the k top-ranked (ties: the later step ranks higher)."""
    newest = max((c.step for c in committed), default=None)
    ranked = [c for c in committed if valid_metric(c)]
    kept = {c.step for c in ranked if sum(beats(o, c, mode) for o in ranked) < k} | {newest}
    expected = sorted(c.step for c in committed if c.step not in kept)
    assert to_delete(committed, best_only(KeepBest(METRIC, mode, k))) == expected


@given(candidates(), st.sampled_from(["min", "max"]), st.integers(1, 5))
def test_missing_or_nan_metric_never_protects(committed, mode, k) -> None:
    result = set(to_delete(committed, best_only(KeepBest(METRIC, mode, k))))
    newest = max((c.step for c in committed), default=None)
    for c in committed:
        if not valid_metric(c) and c.step != newest:
            assert c.step in result


@given(scenarios())
def test_milestones_kept(scenario) -> None:
    committed, policy, hooks, protected = scenario
    if policy.keep_every_steps is None:
        return
    result = to_delete(committed, policy, hooks, protected)
    assert all(step % policy.keep_every_steps != 0 for step in result)


@given(scenarios())
def test_keep_if_true_never_deleted(scenario) -> None:
    committed, policy, hooks, protected = scenario
    if hooks.keep_if is None:
        return
    result = set(to_delete(committed, policy, hooks, protected))
    assert not any(hooks.keep_if(c) for c in committed if c.step in result)


@given(candidates(), st.sets(st.integers(0, 5000)))
def test_no_rules_deletes_nothing(committed, protected) -> None:
    assert to_delete(committed, OFF, protected=protected) == []


@given(policies, st.sets(st.integers(0, 5000)))
def test_empty_input_deletes_nothing(policy, protected) -> None:
    assert to_delete([], policy, protected=protected) == []


@given(scenarios(), st.randoms())
def test_deterministic_and_order_independent(scenario, rnd) -> None:
    committed, policy, hooks, protected = scenario
    first = to_delete(committed, policy, hooks, protected)
    shuffled = list(committed)
    rnd.shuffle(shuffled)
    assert to_delete(committed, policy, hooks, protected) == first
    assert to_delete(shuffled, policy, hooks, protected) == first


@given(scenarios())
def test_idempotent_over_survivors(scenario) -> None:
    committed, policy, hooks, protected = scenario
    deleted = set(to_delete(committed, policy, hooks, protected))
    survivors = [c for c in committed if c.step not in deleted]
    assert to_delete(survivors, policy, hooks, protected) == []


@given(scenarios())
def test_rules_union_their_keeps(scenario) -> None:
    """Deleted under all rules == deleted under every single rule alone (keeps are a union)."""
    committed, policy, hooks, protected = scenario
    singles = single_rules(policy, hooks)
    if not singles:
        return
    expected = set.intersection(*(set(to_delete(committed, p, h, protected)) for p, h in singles))
    assert to_delete(committed, policy, hooks, protected) == sorted(expected)


# --- examples -----------------------------------------------------------------------------------


def cands(*pairs: tuple[int, float | None]) -> list[Candidate]:
    return [Candidate(s, {} if v is None else {METRIC: v}) for s, v in pairs]


def test_keep_last_example() -> None:
    committed = cands((10, None), (20, None), (30, None), (40, None))
    assert to_delete(committed, RetentionPolicy(keep_last=2)) == [10, 20]


def test_keep_last_one_still_keeps_protected() -> None:
    committed = cands((10, None), (20, None), (30, None))
    assert to_delete(committed, RetentionPolicy(keep_last=1), protected={10}) == [20]


def test_keep_best_min_and_max() -> None:
    committed = cands((10, 0.5), (20, 0.1), (30, 0.9), (40, 0.7))
    assert to_delete(committed, best_only(KeepBest(METRIC))) == [10, 30]
    assert to_delete(committed, best_only(KeepBest(METRIC, mode="max"))) == [10, 20]


def test_keep_best_tie_later_step_wins() -> None:
    committed = cands((10, 0.1), (20, 0.1), (30, 0.1), (40, 0.9))
    assert to_delete(committed, best_only(KeepBest(METRIC, k=1))) == [10, 20]


def test_keep_best_nan_and_missing_never_best() -> None:
    committed = cands((10, math.nan), (20, None), (30, 5.0), (40, 9.0))
    assert to_delete(committed, best_only(KeepBest(METRIC, k=3))) == [10, 20]


def test_keep_every_steps_and_keep_if() -> None:
    committed = cands(*((s, None) for s in range(100, 1100, 100)))
    policy = RetentionPolicy(keep_last=None, keep_every_steps=500)
    hooks = RetentionHooks(keep_if=lambda c: c.step == 300)
    assert to_delete(committed, policy, hooks) == [100, 200, 400, 600, 700, 800, 900]


def test_keep_weights_if_thins_what_it_picks_and_works_without_config_rules() -> None:
    committed = cands(*((s, None) for s in range(1, 7)))
    hooks = RetentionHooks(keep_weights_if=lambda c: c.step % 3 == 0)
    got = plan_retention(committed, OFF, hooks=hooks)
    assert got.drop_optimizer == [3] and got.delete == [1, 2, 4, 5]  # 6: the newest, whole


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
    got = plan_retention(committed, policy)
    assert got.drop_optimizer == [10, 20, 30, 60]  # 70 is the newest: kept whole
    assert got.delete == [40, 50]
    # weights already dropped are not thinned twice
    thinned = [dataclasses.replace(c, weights_only=c.step == 20) for c in committed]
    assert plan_retention(thinned, policy).drop_optimizer == [10, 30, 60]


def test_step_dirname() -> None:
    assert step_dirname(1000) == "step-000001000"
    assert step_dirname(0) == "step-000000000"
    with pytest.raises(ValueError):
        step_dirname(-1)


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
