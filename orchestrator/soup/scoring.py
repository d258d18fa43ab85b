"""Who scores a soup, and the scores: the run's task (evaluate.Judge) or the user's own
evaluation (user_eval.UserJudge); each ingredient's scores (reused from sibling soups scored
the same way); the soup as written, read back before the commit.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from orchestrator.errors import CheckpointCorrupt, UsageError
from orchestrator.soup import evaluate, user_eval, writer
from orchestrator.soup.kitchen import Kitchen

if TYPE_CHECKING:
    import torch

    from orchestrator.config import SoupConfig

log = logging.getLogger(__name__)

EVAL_RECIPES = ("greedy", "learned")


def needs_judge(cfg: SoupConfig) -> bool:
    return cfg.recipe in EVAL_RECIPES or cfg.report or cfg.recompute_bn or user_eval.wanted(cfg)


def build_judge(kitchen: Kitchen) -> evaluate.Judge | user_eval.UserJudge:
    """The user's evaluation when one is given (soup.eval_cmd/eval_hook), else the run's task."""
    if user_eval.wanted(kitchen.cfg):
        return user_eval.build(kitchen.cfg)
    run = next((i.run for i in kitchen.ingredients if i.run), None)
    if run is None:
        raise UsageError(
            f"recipe {kitchen.cfg.recipe} (or --report/--recompute-bn) needs the run's task: "
            "name run dirs or their checkpoints, not only .safetensors files, or score with "
            "your own --eval CMD / --eval-hook MOD:FN (greedy, --report)"
        )
    cfg = kitchen.cfg
    return evaluate.Judge(run, kitchen.storage, cfg.metric, cfg.mode, cfg.eval_batch_size)


def optional_judge(kitchen: Kitchen) -> evaluate.Judge | None:
    """The run's task, so a window merge scores itself on the held-out split (its
    `soup_scores`); None, with a warning, when the task cannot be built here."""
    from orchestrator.errors import ConfigError

    try:
        judge = build_judge(kitchen)
    except (UsageError, ConfigError) as exc:
        log.warning("the merge is not scored: %s", exc)
        return None
    assert isinstance(judge, evaluate.Judge)
    return judge


def score_ingredients(kitchen: Kitchen) -> list[dict[str, float]]:
    """Each ingredient's validation (and test, for the report) scores, one model at a time;
    scores recorded for the same checkpoint (same manifest checksum) by a sibling soup's
    SOUP.json are reused instead of recomputed."""
    judge = kitchen.judge
    assert judge is not None
    t0 = time.perf_counter()
    want_test = kitchen.cfg.report and judge.has_test
    cached = cached_scores(kitchen, judge.how if isinstance(judge, user_eval.UserJudge) else None)
    scores = []
    for ing, src in zip(kitchen.ingredients, kitchen.sources, strict=True):
        got = cached.get(ing.manifest_checksum or "")
        if (
            got
            and judge.metric in got
            and (not want_test or any(k.startswith("test/") for k in got))
        ):
            scores.append(dict(got))
            continue
        state = evaluate.read_state(src)
        got = judge.score(state)
        if want_test:
            got.update(judge.score(state, split="test"))
        scores.append(got)
    kitchen.timings["score_ingredients_s"] = time.perf_counter() - t0
    return scores


def cached_scores(kitchen: Kitchen, how: dict[str, str] | None) -> dict[str, dict[str, float]]:
    """manifest checksum -> scores, from the committed soups next to this one scored the same
    way (`how`: the user's command or hook; None: the run's task)."""
    parent, _ = writer.split_out(kitchen.out, kitchen.storage)
    found: dict[str, dict[str, float]] = {}
    try:
        names = parent.list("")
    except (FileNotFoundError, NotADirectoryError):
        return found
    for name in names:
        try:
            record = writer.read_record(parent.child(name))
        except (UsageError, CheckpointCorrupt, OSError):
            continue
        made = record.get("evaluation") or {}
        if (how or {}) != {k: v for k, v in made.items() if k in ("command", "hook")}:
            continue
        for ing in record.get("ingredients", []):
            if ing.get("manifest_checksum") and ing.get("scores"):
                found.setdefault(ing["manifest_checksum"], ing["scores"])
    return found


def score_written(kitchen: Kitchen, parent: Any, write_rel: str,
                   written: writer.Written) -> dict[str, float]:  # fmt: skip
    """Scores of the soup exactly as written (read back before the commit)."""
    from safetensors.torch import load

    judge = kitchen.judge
    assert judge is not None
    state: dict[str, torch.Tensor] = {}
    for shard in written.shards:
        state.update(load(parent.read_bytes(f"{write_rel}/{shard}")))
    scores = judge.score(state)
    if judge.has_test:
        scores.update(judge.score(state, split="test"))
    return scores
