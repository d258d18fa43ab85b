"""One soup, start to finish: ingredients -> pre-flight checks -> recipe -> files -> commit.

    resolve the sources into ingredients (selection rules)       ingredients.py
    open each one's tensor index; same keys, shapes, dtypes       reader.py, engine.check_layout
    verify what it reads against its manifest, as it reads it     checks.py, provenance.Integrity
    recipe: uniform / weighted need no model; greedy / learned    engine.py, recipes.py
            score with the run's task (evaluate.py) or the user's --eval
            command / --eval-hook (user_eval.py)
    stream the output (sharded safetensors), then SOUP.json last  writer.py, checkpoint/commit.py

Nothing is committed unless every check passed: a refusal after the files were written leaves
only an uncommitted attempt (a temp dir locally, a nonce dir on S3), which readers ignore.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError
from orchestrator.soup import (
    engine,
    evaluate,
    provenance,
    recipes,
    schedules,
    scoring,
    segments,
    user_eval,
    writer,
)
from orchestrator.soup.ingredients import Ingredient, resolve
from orchestrator.soup.kitchen import Kitchen, Mixture
from orchestrator.soup.reader import open_source

if TYPE_CHECKING:
    import torch

    from orchestrator.config import SoupConfig
    from orchestrator.storage import StorageOptions

log = logging.getLogger(__name__)

UNRELATED_COSINE = 0.2  # below: the weights share no starting point (see engine.Similarity)
EVAL_RECIPES = scoring.EVAL_RECIPES


def prepare(
    sources: Sequence[str], cfg: SoupConfig, storage: StorageOptions | None, out: str
) -> Kitchen:
    t0 = time.perf_counter()
    ingredients = resolve(sources, cfg, storage)
    opened = [open_source(i, storage, cfg.prefix) for i in ingredients]
    engine.check_layout(opened)
    if cfg.recipe == "weighted":
        engine.normalised(cfg.weights, len(opened))
    if cfg.recipe == "window":
        window_of(ingredients, cfg.schedule)
    kitchen = Kitchen(cfg, storage, ingredients, opened, out)
    kitchen.timings["plan_s"] = time.perf_counter() - t0
    return kitchen


def dry_run(kitchen: Kitchen) -> list[str]:
    """The ingredients chosen and why, and the bytes a real run reads."""
    cfg = kitchen.cfg
    lines = [f"soup {cfg.recipe} -> {kitchen.out} ({len(kitchen.ingredients)} ingredients)"]
    weights = planned_weights(kitchen)
    for i, ing in enumerate(kitchen.ingredients):
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(ing.metrics.items()))
        weight = f"weight={weights[i]:.4f}  " if weights else ""
        lines.append(f"  {ing.label:>12}  {weight}{ing.url}  [{ing.why}]  {metrics}".rstrip())
    if cfg.recipe == "window":
        lines.append(
            f"window {cfg.schedule}: {window_of(kitchen.ingredients, cfg.schedule).formula}"
        )
    model = kitchen.sources[0].model_bytes
    mixer_bytes = _planned_bytes(kitchen)
    lines.append(f"model tensors: {_mb(model)} per ingredient; the soup reads {_mb(mixer_bytes)}")
    if cfg.verify == "checksums":
        lines.append("verification: checksums of the files the soup reads, hashed as it reads them")
    if cfg.recipe in EVAL_RECIPES:
        lines.append(f"{cfg.recipe} also reads each ingredient whole (~{_mb(model)} each)")
    return lines


def planned_weights(kitchen: Kitchen) -> list[float] | None:
    """Each ingredient's weight, in ingredient order, for the recipes that know it up front."""
    cfg = kitchen.cfg
    if cfg.recipe == "window":
        return window_of(kitchen.ingredients, cfg.schedule).weights
    if cfg.recipe in ("uniform", "weighted"):
        return engine.normalised(cfg.weights or None, len(kitchen.ingredients))
    return None


def window_of(ingredients: Sequence[Ingredient], rule: str) -> schedules.Window:
    runs = sorted({i.run for i in ingredients if i.run})
    if len(runs) > 1:  # distinct steps of several runs are no one trajectory's window
        raise UsageError(
            f"a window merge is over one run's checkpoints; got {len(runs)} runs ({runs[0]}, "
            "...): name one run dir (several runs: --recipe uniform or weighted)"
        )
    return schedules.window_weights([i.step for i in ingredients], rule)


def _planned_bytes(kitchen: Kitchen) -> int:
    weights = planned_weights(kitchen) if kitchen.cfg.recipe in ("weighted", "window") else None
    names = list(kitchen.sources[0].specs)
    mixer = engine.Mixer(kitchen.sources, weights, names)
    try:
        return mixer.bytes_planned()
    finally:
        mixer.close()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --- the recipes -------------------------------------------------------------------------------


def choose(kitchen: Kitchen) -> Mixture:
    cfg, srcs = kitchen.cfg, kitchen.sources
    if cfg.recipe == "uniform":
        return Mixture(srcs)
    if cfg.recipe == "weighted":
        weights = engine.normalised(cfg.weights, len(srcs))
        return Mixture(srcs, weights, details={"weights": weights})
    if cfg.recipe == "window":
        return _window(kitchen)
    judge = kitchen.judge
    assert judge is not None
    scores = scoring.score_ingredients(kitchen)
    if cfg.recipe == "greedy":
        g = recipes.greedy(judge, srcs, scores)
        details = {
            "order": [srcs[i].ingredient.label for i in g.order],
            "chosen": [srcs[i].ingredient.label for i in g.chosen],
            "tries": [
                {"added": srcs[i].ingredient.label, "accepted": ok, "scores": s}
                for i, ok, s in zip(g.order[1:], g.accepted, g.soup_scores, strict=True)
            ],
        }
        return Mixture([srcs[i] for i in g.chosen], None, None, details, scores)
    assert isinstance(judge, evaluate.Judge)  # config refuses learned with a user evaluation
    got = recipes.learned(
        judge, srcs, per_layer=cfg.per_layer, epochs=cfg.learned_epochs, lr=cfg.learned_lr,
        max_memory_gb=cfg.max_memory_gb,
    )  # fmt: skip
    details = {"per_layer": cfg.per_layer, "epoch_losses": got.losses}
    if got.weights is not None:
        return Mixture(srcs, got.weights, None, {**details, "weights": got.weights}, scores)
    return Mixture(srcs, None, got.state, {**details, "coefficients": got.per_layer}, scores)


def _window(kitchen: Kitchen) -> Mixture:
    """The window's weights, sources in step order (the order the mixer adds them in)."""
    w = window_of(kitchen.ingredients, kitchen.cfg.schedule)
    order = sorted(range(len(w.steps)), key=lambda k: w.steps[k])
    weights = [w.weights[k] for k in order]
    details = {"schedule": w.rule, "formula": w.formula, "steps": [w.steps[k] for k in order],
               "weights": weights, "covers": [list(w.covers[k]) for k in order]}  # fmt: skip
    return Mixture([kitchen.sources[k] for k in order], weights, details=details)


# --- the whole thing ---------------------------------------------------------------------------


def cook(kitchen: Kitchen, progress: Callable[[int], object] | None = None) -> dict[str, Any]:
    """Make the soup and commit it; returns the record written to SOUP.json."""
    t_start = time.perf_counter()
    engine.keep_big_allocations_mapped()
    engine.warm_up(kitchen.sources[0].specs)
    provenance.reset_peak_rss()
    rss0 = provenance.rss_bytes()
    integrity = provenance.Integrity(kitchen)
    try:
        record = _cook_checked(kitchen, progress, integrity, t_start, rss0)
    except BaseException:
        integrity.check()  # a corrupt ingredient explains any failure above: say that instead
        raise
    return record


def _cook_checked(kitchen: Kitchen, progress: Callable[[int], object] | None,
                  integrity: provenance.Integrity, t_start: float, rss0: int) -> dict[str, Any]:  # fmt: skip
    from orchestrator.checkpoint.commit import commit_strategy

    if scoring.needs_judge(kitchen.cfg):
        kitchen.judge = scoring.build_judge(kitchen)
    elif kitchen.cfg.recipe == "window":
        kitchen.judge = scoring.optional_judge(kitchen)
    related: dict[str, Any] = {"method": "skipped (--allow-unrelated)"}
    midpoint = isinstance(kitchen.judge, evaluate.Judge) and kitchen.cfg.recipe in EVAL_RECIPES
    if midpoint and not kitchen.cfg.allow_unrelated:
        assert isinstance(kitchen.judge, evaluate.Judge)
        labels = [i.label for i in kitchen.ingredients]
        related = evaluate.check_related(kitchen.judge, kitchen.sources, labels)
    t0 = time.perf_counter()
    mixture = choose(kitchen)
    kitchen.timings["recipe_s"] = time.perf_counter() - t0
    if kitchen.cfg.recompute_bn:
        mixture = _recompute_bn(kitchen, mixture)
    parent, name = writer.split_out(kitchen.out, kitchen.storage)
    strategy = commit_strategy(parent, writer.RECORD)
    attempt = strategy.prepare(name)
    t0 = time.perf_counter()
    written, mixer_info = _write(kitchen, mixture, parent, attempt.write_rel, progress, integrity)
    kitchen.timings["write_s"] = time.perf_counter() - t0
    if not midpoint and not kitchen.cfg.allow_unrelated:
        related = _check_cosine(kitchen, mixer_info["cosine"])
    record = provenance.record(kitchen, mixture, written, mixer_info, related, attempt.data_dir)
    if kitchen.judge is not None:
        record["soup_scores"] = scoring.score_written(kitchen, parent, attempt.write_rel, written)
        if isinstance(kitchen.judge, user_eval.UserJudge):
            record["evaluation"] = kitchen.judge.record()
    if kitchen.cfg.report:
        from orchestrator.soup import report

        png = report.plot(record, kitchen.judge.metric if kitchen.judge else "eval/loss")
        parent.write_bytes(f"{attempt.write_rel}/{report.PNG}", png)
        from orchestrator.checkpoint.format import hash_bytes

        record["files"][attempt.final_name(report.PNG)] = asdict(hash_bytes(png))
    integrity.check()
    kitchen.timings["total_s"] = time.perf_counter() - t_start
    record["timings"] = dict(kitchen.timings)
    record["memory"] = {"peak_rss_bytes": provenance.peak_rss_bytes(), "rss_at_start_bytes": rss0}
    strategy.commit(attempt, writer.record_bytes(record))
    return record


def _recompute_bn(kitchen: Kitchen, mixture: Mixture) -> Mixture:
    judge = kitchen.judge
    assert isinstance(judge, evaluate.Judge)  # config refuses --recompute-bn with a user eval
    if not evaluate.has_batchnorm(judge):
        log.warning("--recompute-bn: the model has no BatchNorm layer; nothing to recompute")
        return mixture
    state = mixture.state if mixture.state is not None else _in_memory(mixture)
    state = judge.recompute_bn(state)
    details = {**mixture.details, "recomputed_bn": True}
    return Mixture(mixture.sources, mixture.weights, state, details, mixture.ingredient_scores)


def _in_memory(mixture: Mixture) -> dict[str, torch.Tensor]:
    names = list(mixture.sources[0].specs)
    mixer = engine.Mixer(mixture.sources, mixture.weights, names)
    try:
        return {name: mixer.next(name) for name in names}
    finally:
        mixer.close()


def _write(kitchen: Kitchen, mixture: Mixture, parent: Any, write_rel: str,
           progress: Callable[[int], object] | None,
           integrity: provenance.Integrity) -> tuple[writer.Written, dict[str, Any]]:  # fmt: skip
    specs = kitchen.sources[0].specs
    order = segments.storage_order(mixture.sources[0])
    shards = writer.plan_shards(specs, int(kitchen.cfg.shard_mb * 1_000_000), order)
    metadata = {"format": "pt", "stockpot_soup": kitchen.cfg.recipe}
    names = [e.name for shard in shards for e in shard]
    if mixture.state is not None:
        state = mixture.state
        written = writer.write_files(parent, write_rel, shards, lambda name: [state[name]],
                                     metadata, order=order, progress=progress)  # fmt: skip
        return written, {"cosine": None, "ties": {}, "bytes_read": 0}
    mixer = engine.Mixer(mixture.sources, mixture.weights, names, workers=kitchen.cfg.read_workers,
                         checksums=kitchen.cfg.verify == "checksums")  # fmt: skip
    t0, cpu0 = time.perf_counter(), time.process_time()
    threads = engine.SingleThreaded()
    try:
        written = writer.write_files(parent, write_rel, shards, mixer.chunks, metadata,
                                     order=order, progress=progress)  # fmt: skip
        integrity.streamed.update(mixer.checks.finish())
    finally:
        mixer.close()
        threads.restore()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    info = {
        "cosine": mixer.similarity.cosine(),
        "ties": mixer.ties,
        "bytes_read": mixer.stats.bytes_read,
        "pieces_read": mixer.stats.pieces,
        "read_workers": kitchen.cfg.read_workers,
        "chunk_bytes": mixer.chunk,
        "mix_s": seconds,
        "mix_mb_per_s": mixer.stats.bytes_read / 1e6 / max(seconds, 1e-9),
        # what limits it: waiting for the disk, for the writer thread, or CPU (all threads)
        "read_wait_s": mixer.stats.wait_s,
        "write_wait_s": written.wait_s,
        "cpu_s": cpu,
    }
    return written, info


def _check_cosine(kitchen: Kitchen, cosine: float | None) -> dict[str, Any]:
    if cosine is not None and cosine < UNRELATED_COSINE:
        labels = [i.label for i in kitchen.ingredients]
        raise UsageError(
            f"the ingredients ({', '.join(labels)}) look unrelated: the mean cosine between "
            f"their weights is {cosine:.3f} (< {UNRELATED_COSINE}); soups need one shared "
            "starting point (pass --allow-unrelated to soup them anyway); nothing was committed"
        )
    return {"method": "mean pairwise cosine of the weight matrices",
            "threshold": UNRELATED_COSINE, "cosine": cosine}  # fmt: skip
