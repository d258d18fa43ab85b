"""Which committed checkpoints to delete (a pure planner) and the thin shell that deletes them.

A checkpoint is kept if ANY rule keeps it. Whatever the rules say, the newest committed checkpoint
and every protected step (an in-flight save, a running soup's inputs) survive.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from orchestrator.checkpoint.layout import MANIFEST_NAME, step_rel
from orchestrator.errors import require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One committed checkpoint as the planner sees it; `metrics` may lack a key or hold NaN."""

    step: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class KeepBest:
    """Keep the `k` best checkpoints by `metric`; `mode` says whether lower or higher is better.

    Also the `checkpoint.keep_best` section of the config schema (one type, validated once), so
    its errors are the config's one-line ConfigErrors and a comment documents every field.
    """

    # Metric name from eval (e.g. `eval/loss`); null disables keep-best retention.
    metric: str | None = None
    # `min` keeps the lowest values, `max` the highest.
    mode: Literal["min", "max"] = "min"
    # How many best checkpoints to keep.
    k: int = 1

    def __post_init__(self) -> None:
        require(
            self.metric != "",
            "checkpoint.keep_best.metric must name a metric (got an empty string); "
            "use null to turn keep-best off",
        )
        require(
            self.mode in ("min", "max"),
            f"checkpoint.keep_best.mode must be 'min' or 'max' (got {self.mode!r})",
        )
        # bool is an int subclass; `k: true` must not silently mean 1.
        require(
            isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1,
            f"checkpoint.keep_best.k must be >= 1 (got {self.k})",
        )


@dataclass(frozen=True)
class RetentionPolicy:
    """Rules whose keeps are united; a rule left at None is off, and with every rule off nothing
    is deleted."""

    keep_last: int | None = None  # keep the newest N committed checkpoints
    keep_best: KeepBest | None = None  # the k best by a metric; missing/NaN never count
    keep_every_steps: int | None = None  # keep milestones: every step with step % N == 0
    keep_if: Callable[[Candidate], bool] | None = None  # Python-API hook: True keeps it

    def __post_init__(self) -> None:
        if self.keep_last is not None:
            _require_positive("keep_last", self.keep_last, "use null to turn the rule off")
        if self.keep_every_steps is not None:
            _require_positive("keep_every_steps", self.keep_every_steps, "use null to turn it off")
        if self.keep_if is not None and not callable(self.keep_if):
            raise ValueError(f"keep_if must be callable (got {type(self.keep_if).__name__})")

    @property
    def has_rules(self) -> bool:
        best = self.keep_best.metric if self.keep_best is not None else None
        rules = (self.keep_last, best, self.keep_every_steps, self.keep_if)
        return any(rule is not None for rule in rules)


def _require_positive(name: str, value: object, fix: str) -> None:
    # bool is an int subclass; `keep_last: true` in YAML must not silently mean 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r}); {fix}")


def plan_retention(
    committed: Sequence[Candidate], policy: RetentionPolicy, *, protected: Collection[int] = ()
) -> list[int]:
    """Steps to delete, ascending and without duplicates; see the module docstring for the rules."""
    by_step = {c.step: c for c in committed}
    if not by_step or not policy.has_rules:
        return []
    keep = {max(by_step)} | set(protected)
    if policy.keep_last is not None:
        keep.update(sorted(by_step, reverse=True)[: policy.keep_last])
    if policy.keep_best is not None:
        keep.update(_best_steps(by_step.values(), policy.keep_best))
    if policy.keep_every_steps is not None:
        keep.update(s for s in by_step if s % policy.keep_every_steps == 0)
    if policy.keep_if is not None:
        keep.update(s for s, c in by_step.items() if policy.keep_if(c))
    return sorted(set(by_step) - keep)


def _best_steps(candidates: Iterable[Candidate], rule: KeepBest) -> list[int]:
    """The k best steps; on a tie in the metric the later step wins (it has trained longer)."""
    metric = rule.metric
    if metric is None:  # the rule is off
        return []
    scored = [
        (c.metrics[metric], c.step)
        for c in candidates
        if metric in c.metrics and not math.isnan(c.metrics[metric])
    ]
    sign = 1.0 if rule.mode == "min" else -1.0
    scored.sort(key=lambda vs: (sign * vs[0], -vs[1]))
    return [step for _, step in scored[: rule.k]]


class DeletingStore(Protocol):
    """The one method of `orchestrator.storage.Store` the deleter needs."""

    def delete(self, rel: str, *, recursive: bool = False) -> None: ...


def delete_checkpoints(
    store: DeletingStore, steps: Iterable[int], *, log: logging.Logger = logger
) -> list[int]:
    """Delete each step's manifest, then its directory; return the steps fully deleted.

    The manifest goes first so a half-deleted checkpoint is already uncommitted, never mistaken for
    one. Failures are logged and skipped, never raised: a raise would stop retention for the rest
    of the run (torchtitan's keep_latest_k would silently stop), while skipping lets the next
    save's plan retry a surviving manifest, and GC removes an uncommitted rest.
    """
    deleted = []
    for step in dict.fromkeys(steps):
        step_dir = step_rel(step)
        if _try_delete(store, f"{step_dir}/{MANIFEST_NAME}", False, log) and _try_delete(
            store, step_dir, True, log
        ):
            deleted.append(step)
    return deleted


def _try_delete(store: DeletingStore, rel: str, recursive: bool, log: logging.Logger) -> bool:
    try:
        store.delete(rel, recursive=recursive)
    except Exception as exc:  # any backend error: see delete_checkpoints for why we never raise
        log.warning("retention: could not delete %s (%r); skipped, retried later", rel, exc)
        return False
    return True
