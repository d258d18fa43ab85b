"""Ingredients: which checkpoints go into a soup, and why.

The selection rules are pure functions over `(step, metrics)` candidates, applied in a fixed
order (steps, every, improved_any, top, last) so each one's effect can be reported:

    steps A:B      keep A <= step <= B (either side may be empty)
    every N        keep steps that are multiples of N
    improved_any   keep a checkpoint if, in step order, it beats every earlier one on at least
                   one of the metrics (BirdCLEF 2024's checkpoint soup); the first one with a
                   value counts as an improvement
    top K          keep the K best by `metric` (`mode`), then back in step order
    last K         keep the newest K

`resolve` turns the sources a user names (a run dir, a sweep dir or several run dirs, a
committed checkpoint, a .safetensors file; local or s3://) into `Ingredient`s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from orchestrator.errors import UsageError
from orchestrator.metric_rules import finite, improved_any, metric_mode

if TYPE_CHECKING:
    from orchestrator.checkpoint.catalog import CheckpointInfo
    from orchestrator.config import SoupConfig
    from orchestrator.storage import StorageOptions, Store

Kind = Literal["dcp", "safetensors"]


@dataclass(frozen=True)
class Candidate:
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ingredient:
    url: str  # the checkpoint directory or the .safetensors file
    kind: Kind
    why: str  # which source and rules chose it, for --dry-run and SOUP.json
    step: int | None = None
    run: str | None = None  # the run dir it belongs to (its config.yaml builds the task)
    manifest_checksum: str | None = None  # xxh3-128 of MANIFEST.json (dcp) or of the file
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.step is not None else self.url.rsplit("/", 1)[-1]


# --- pure rules --------------------------------------------------------------------------------


def parse_steps(text: str) -> tuple[int | None, int | None]:
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
    except ValueError:
        raise UsageError(f"--steps must be A:B, e.g. 100:500 or 200: (got {text!r})") from None


def top_k(cands: Sequence[Candidate], k: int, metric: str, mode: str) -> list[Candidate]:
    """The k best by `metric` (ties: the newer wins), back in step order; unscored ones drop."""
    sign = 1 if mode == "min" else -1
    scored = [c for c in cands if finite(c.metrics.get(metric))]
    ranked = sorted(scored, key=lambda c: (sign * c.metrics[metric], -c.step))[:k]
    return sorted(ranked, key=lambda c: c.step)


def select(cands: Sequence[Candidate], cfg: SoupConfig) -> tuple[list[Candidate], list[str]]:
    """Apply the configured rules in order; the kept candidates and one line per rule applied
    (e.g. `steps 100:200 kept 3 of 7`)."""
    kept = sorted(cands, key=lambda c: c.step)
    trail = [f"{len(kept)} committed"]

    def apply(name: str, new: list[Candidate]) -> None:
        nonlocal kept
        trail.append(f"{name} kept {len(new)} of {len(kept)}")
        kept = new

    if cfg.steps is not None:
        lo, hi = parse_steps(cfg.steps)
        apply(
            f"steps {cfg.steps}",
            [c for c in kept if (lo is None or c.step >= lo) and (hi is None or c.step <= hi)],
        )
    if cfg.every is not None:
        apply(f"every {cfg.every}", [c for c in kept if c.step % cfg.every == 0])
    if cfg.improved_any:
        apply(f"improved_any {','.join(cfg.improved_any)}", improved_any(kept, cfg.improved_any))
    if cfg.top is not None:
        metric = cfg.metric or "eval/loss"
        mode = metric_mode(metric, cfg.mode)
        apply(f"top {cfg.top} by {metric} ({mode})", top_k(kept, cfg.top, metric, mode))
    if cfg.last is not None:
        apply(f"last {cfg.last}", kept[-cfg.last :])
    return kept, trail


def require_two(count: int, trail: Sequence[str], where: str) -> None:
    if count < 2:
        raise UsageError(
            f"a soup needs at least 2 ingredients; {where}: {'; '.join(trail)} "
            f"(left {count}); loosen the rules or add sources"
        )


# --- sources -> ingredients --------------------------------------------------------------------


def resolve(
    sources: Sequence[str], cfg: SoupConfig, storage: StorageOptions | None = None
) -> list[Ingredient]:
    """The ingredients named by `sources` under `cfg`'s rules; UsageError if fewer than two."""
    from orchestrator.storage import Store

    if not sources:
        raise UsageError("no sources: name run dirs, checkpoints or .safetensors files")
    runs: list[Store] = []
    found: list[Ingredient] = []
    for url in sources:
        kind = _classify(url, storage)
        if kind == "run":
            runs.append(Store(url, storage))
        elif kind == "sweep":
            runs += _sweep_runs(Store(url, storage))
        else:
            found.append(_single(url, kind, storage))
    if len(runs) == 1 and not found:
        return _checkpoint_soup(runs[0], cfg)
    found += [_run_pick(run, cfg) for run in runs]
    require_two(
        len(found), [f"{len(sources)} source(s) gave {len(found)} ingredient(s)"], "sources"
    )
    return found


def _classify(url: str, storage: StorageOptions | None) -> str:
    from orchestrator.checkpoint.format import CHECKPOINTS_DIR, MANIFEST_NAME
    from orchestrator.storage import Store

    if url.endswith(".safetensors"):
        return "safetensors"
    store = Store(url, storage)
    if store.exists(MANIFEST_NAME):
        return "checkpoint"
    if store.exists(CHECKPOINTS_DIR):
        return "run"
    if store.exists("") and _sweep_runs(store):
        return "sweep"
    raise UsageError(
        f"{store.path()} is not a run dir, a sweep dir, a committed checkpoint or a "
        ".safetensors file"
    )


def _sweep_runs(store: Store) -> list[Store]:
    from orchestrator.checkpoint.format import CHECKPOINTS_DIR

    children = [store.child(name) for name in sorted(store.list(""))]
    return [child for child in children if child.exists(CHECKPOINTS_DIR)]


def _single(url: str, kind: str, storage: StorageOptions | None) -> Ingredient:
    from orchestrator.checkpoint import catalog
    from orchestrator.storage import Store

    if kind == "safetensors":
        parent, _, name = url.rpartition("/")
        if not Store(parent or ".", storage).exists(name):
            raise UsageError(f"{url}: no such .safetensors file")
        return Ingredient(url, "safetensors", "named on the command line")
    store = Store(url, storage)
    info = catalog.load_info(store)
    return _from_info(store, info, "named on the command line", run=None)


def _from_info(ckpt: Store, info: CheckpointInfo, why: str, run: str | None) -> Ingredient:
    from orchestrator.checkpoint.format import MANIFEST_NAME, hash_bytes

    checksum = hash_bytes(ckpt.read_bytes(MANIFEST_NAME)).checksum
    return Ingredient(
        ckpt.path(), "dcp", why, info.step, run, checksum, dict(info.manifest.metrics)
    )


def _checkpoint_soup(run: Store, cfg: SoupConfig) -> list[Ingredient]:
    from orchestrator.checkpoint import catalog

    infos = {info.step: info for info in catalog.scan(run).committed}
    kept, trail = select([Candidate(s, i.metrics) for s, i in infos.items()], cfg)
    require_two(len(kept), trail, run.path())
    why = "; ".join(trail[1:]) or "every committed checkpoint"
    return [_from_info(run.child(infos[c.step].rel), infos[c.step], why, run.path()) for c in kept]


def _run_pick(run: Store, cfg: SoupConfig) -> Ingredient:
    """One run's ingredient: its newest checkpoint after the rules, or its best by metric."""
    from orchestrator.checkpoint import catalog

    infos = {info.step: info for info in catalog.scan(run).committed}
    kept, trail = select([Candidate(s, i.metrics) for s, i in infos.items()], cfg)
    if not kept:
        raise UsageError(f"{run.path()}: no checkpoint left ({'; '.join(trail)})")
    pick, why = kept[-1], "its newest checkpoint"
    if cfg.metric:
        mode = metric_mode(cfg.metric, cfg.mode)
        best = top_k(kept, 1, cfg.metric, mode)
        if not best:
            raise UsageError(f"{run.path()}: no checkpoint has metric {cfg.metric!r}")
        pick, why = best[0], f"its best by {cfg.metric} ({mode})"
    info = infos[pick.step]
    return _from_info(run.child(info.rel), info, why, run.path())
