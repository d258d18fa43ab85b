"""Which committed checkpoints to delete or thin to weights only (a pure planner), and the shell.

The rules are the config's `RetentionPolicy` (`checkpoint.keep_*`), plus two Python-API hooks a
YAML file cannot hold (`RetentionHooks`). A checkpoint is kept whole if ANY full rule keeps it
(keep_last, keep_best, keep_every_steps, keep_if). Whatever the rules say, the newest committed
checkpoint and every protected step (an in-flight save, a running soup's inputs) stay whole. A
checkpoint no full rule keeps but a weights rule does (keep_weights_every_steps,
keep_weights_improved, keep_weights_if: soup ingredients) loses its optimizer state: AdamW's is
~2x the model. Any other is deleted.

Dropping the optimizer part never leaves a manifest naming a missing file: the optimizer state
is in files of its own (format/layout.py), so a new manifest naming only the rest (weights_only, a
newer version) replaces the old one atomically (a temp file renamed over it; one PUT on S3)
BEFORE those files are deleted. A kill in between leaves unnamed optimizer files, which the
next sweep removes; resume never picks a weights-only checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from orchestrator.checkpoint.format import MANIFEST_NAME, is_optimizer_file, step_rel
from orchestrator.config.checkpoint import KeepBest, RetentionPolicy
from orchestrator.metric_rules import improved_any

if TYPE_CHECKING:  # the pure planner needs neither; apply_retention imports catalog to run
    from orchestrator.checkpoint.catalog import CheckpointInfo
    from orchestrator.storage import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One committed checkpoint as the planner sees it; `metrics` may lack a key or hold NaN."""

    step: int
    metrics: Mapping[str, float]
    weights_only: bool = False  # its optimizer state was dropped already


Predicate = Callable[[Candidate], bool]


@dataclass(frozen=True)
class RetentionHooks:
    """Rules of the Python API only (a function is no config value), united with the policy's."""

    keep_if: Predicate | None = None  # True keeps the checkpoint whole
    keep_weights_if: Predicate | None = None  # True keeps at least its weights

    def __post_init__(self) -> None:
        for name in ("keep_if", "keep_weights_if"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable (got {type(hook).__name__})")

    @property
    def has_rules(self) -> bool:
        return self.keep_if is not None or self.keep_weights_if is not None


NO_HOOKS = RetentionHooks()


@dataclass(frozen=True)
class RetentionPlan:
    delete: list[int]  # steps to delete, ascending
    drop_optimizer: list[int]  # whole checkpoints to thin to weights only, ascending


def plan_retention(
    committed: Sequence[Candidate],
    policy: RetentionPolicy,
    *,
    protected: Collection[int] = (),
    hooks: RetentionHooks = NO_HOOKS,
) -> RetentionPlan:
    """What to delete and what to thin; see the module docstring for the rules."""
    by_step = {c.step: c for c in committed}
    if not by_step or not (policy.has_rules or hooks.has_rules):
        return RetentionPlan([], [])
    whole = {max(by_step)} | set(protected) | _where(by_step, hooks.keep_if)
    if policy.keep_last is not None:
        whole.update(sorted(by_step, reverse=True)[: policy.keep_last])
    whole.update(_best_steps(by_step.values(), policy.keep_best))
    if policy.keep_every_steps is not None:
        whole.update(s for s in by_step if s % policy.keep_every_steps == 0)
    weights = _where(by_step, hooks.keep_weights_if)
    if policy.keep_weights_every_steps is not None:
        weights.update(s for s in by_step if s % policy.keep_weights_every_steps == 0)
    if policy.keep_weights_improved is not None:
        weights.update(
            c.step for c in improved_any(list(by_step.values()), policy.keep_weights_improved)
        )
    thin = {s for s in weights - whole if not by_step[s].weights_only}
    return RetentionPlan(sorted(set(by_step) - whole - weights), sorted(thin))


def _where(by_step: Mapping[int, Candidate], hook: Predicate | None) -> set[int]:
    return {s for s, c in by_step.items() if hook(c)} if hook is not None else set()


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


def apply_retention(
    run: Store,
    policy: RetentionPolicy,
    *,
    protected: Collection[int] = (),
    hooks: RetentionHooks = NO_HOOKS,
    log: logging.Logger,
    manifests: dict[str, CheckpointInfo] | None = None,
) -> RetentionPlan:
    """Plan over the committed checkpoints of `run`, thin, then delete (the leader, after a
    commit). Never raises: retention must never fail a save; the next save plans again.
    `manifests`: the caller's catalog.scan cache, so each save reads only the new manifest."""
    from orchestrator.checkpoint import catalog

    try:
        committed = catalog.scan(run, manifests).committed
        todo = plan_retention(
            [Candidate(c.step, c.metrics, c.manifest.weights_only) for c in committed],
            policy,
            protected=protected,
            hooks=hooks,
        )
        for info in committed:
            if info.step in todo.drop_optimizer:
                if manifests is not None:
                    manifests.pop(info.rel, None)  # rewritten: read it again next time
                drop_optimizer(run, info, log=log)
        delete_checkpoints(run, todo.delete, log=log)
        return todo
    except Exception as exc:
        log.warning("retention skipped this time: %r", exc)
        return RetentionPlan([], [])


def drop_optimizer(run: Store, info: CheckpointInfo, *, log: logging.Logger = logger) -> int:
    """Thin one committed checkpoint to its weights: the new manifest first, then the files it
    no longer names (see the module docstring). Returns the bytes freed."""
    manifest = info.manifest
    dropped = {name: e for name, e in manifest.files.items() if is_optimizer_file(name)}
    if not manifest.weights_only:
        kept = {name: e for name, e in manifest.files.items() if name not in dropped}
        thin = dataclasses.replace(manifest, files=kept, weights_only=True)
        run.write_bytes(f"{info.rel}/{MANIFEST_NAME}", thin.to_json())  # atomic replace
    for name in dropped:
        run.delete(f"{info.rel}/{name}")
    freed = sum(e.size for e in dropped.values())
    log.info(
        "retention: %s kept as weights only (%.1f MB of optimizer state dropped)",
        info.rel,
        freed / 1e6,
    )
    return freed


def sweep_dropped(run: Store, committed: Iterable[CheckpointInfo]) -> list[str]:
    """Delete optimizer files that weights-only checkpoints no longer name (left by a kill
    between a thinning's manifest and its deletes). Run once per job, with garbage collection."""
    removed = []
    for info in committed:
        if not info.manifest.weights_only:
            continue
        data_rel = info.data_rel
        for name in run.list(data_rel):
            named = info.manifest.data_path(name) in info.manifest.files
            if is_optimizer_file(name) and not named:
                run.delete(f"{data_rel}/{name}")
                removed.append(f"{data_rel}/{name}")
    return removed
