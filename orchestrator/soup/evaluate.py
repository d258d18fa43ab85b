"""Scoring soups with the run's own task: the eval-driven recipes and the report use this.

The task is built from the run's `config.yaml` (`task._target_` and its parameters) and the
model from `task.build_model()`, seeded with `run.seed` like a rank. Selection (greedy, learned,
the shared-starting-point check) uses the validation split (`eval_set`); `test_set()`, when a
task has it, is used by the report only and never by selection.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.errors import ConfigError, UsageError
from orchestrator.metric_rules import metric_mode
from orchestrator.soup.reader import accumulator_dtype

if TYPE_CHECKING:
    from torch import nn

    from orchestrator.soup.reader import Source
    from orchestrator.storage import StorageOptions

State = dict[str, torch.Tensor]
CHECK_BATCHES = 4  # held-out batches the shared-starting-point check scores
# The midpoint of two related ingredients scores about as well as they do; of two unrelated
# ones, far worse. "Far worse": over 1.25x the worse one's loss, plus a small margin.
UNRELATED_FACTOR, UNRELATED_MARGIN = 1.25, 0.05


def read_state(source: Source) -> State:
    """Every model tensor of one ingredient, whole, in memory."""
    state: State = {}
    for name, spec in source.specs.items():
        full = torch.empty(spec.shape, dtype=spec.dtype)
        for piece in source.pieces[name]:
            region = tuple(slice(a, a + n) for a, n in zip(piece.at, piece.shape, strict=True))
            full[region] = source.read(piece, spec)
        state[name] = full
    return state


def mean_state(states: Sequence[State], weights: Sequence[float] | None = None) -> State:
    """Weighted mean of whole states with the engine's numerics (ints from the first)."""
    n = len(states)
    ws = list(weights) if weights is not None else None
    out: State = {}
    for name, first in states[0].items():
        if not first.dtype.is_floating_point:
            out[name] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=accumulator_dtype(first.dtype))
        for i, state in enumerate(states):
            acc.add_(state[name]) if ws is None else acc.add_(state[name], alpha=ws[i])
        out[name] = (acc.div_(n) if ws is None else acc).to(first.dtype)
    return out


class Judge:
    """The run's task and a model to load candidate soups into, and their scores."""

    def __init__(self, run_url: str, storage: StorageOptions | None, metric: str | None,
                 mode: str | None, batch_size: int) -> None:  # fmt: skip
        from orchestrator.tasks import build_task

        cfg = _run_config(run_url, storage)
        self.task = build_task(cfg.task.target, dict(cfg.task.params))
        torch.manual_seed(cfg.run.seed)
        self.model: nn.Module = self.task.build_model()
        self.metric = metric or "eval/loss"
        if not self.metric.startswith("eval/"):
            raise UsageError(f"--metric must be a held-out metric eval/<name> (got {self.metric})")
        self.mode = metric_mode(self.metric, mode)
        self.batch_size = batch_size
        self.has_test = (
            callable(getattr(self.task, "test_set", None)) and self.task.test_set() is not None
        )
        self.train_data = self.task.train_set()

    def load(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        missing = set(self.model.state_dict()) - set(state)
        if missing:
            raise UsageError(f"the soup lacks {sorted(missing)[0]} that the task's model has")
        self.model.load_state_dict(dict(state), strict=False)
        return self.model

    def score(self, state: Mapping[str, torch.Tensor], split: str = "eval",
              batches: int | None = None) -> dict[str, float]:  # fmt: skip
        """`{split}/<metric>` for each metric the task's eval_sums reports."""
        from orchestrator.tasks.base import eval_batches

        data = self.task.eval_set() if split == "eval" else self.task.test_set()
        model = self.load(state)
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for k, indices in enumerate(eval_batches(len(data), self.batch_size, 0, 1)):
                if batches is not None and k >= batches:
                    break
                for key, value in self.task.eval_sums(model, data.batch(indices)).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        count = sums.pop("count", 0.0) or 1.0
        return {f"{split}/{k}": v / count for k, v in sorted(sums.items())}

    def value(self, scores: Mapping[str, float]) -> float:
        if self.metric not in scores:
            raise UsageError(
                f"--metric {self.metric}: the task reports {', '.join(sorted(scores))}"
            )
        return scores[self.metric]

    def better_or_equal(self, a: float, b: float) -> bool:
        return a <= b if self.mode == "min" else a >= b

    def recompute_bn(self, state: State) -> State:
        """BatchNorm running statistics recomputed on training data (torch's update_bn:
        reset, one cumulative pass with momentum None, momentum restored)."""
        from torch.optim.swa_utils import update_bn

        from orchestrator.tasks.base import eval_batches

        model = self.load(state)
        data = self.train_data
        loader = (data.batch(i)[0] for i in eval_batches(len(data), self.batch_size, 0, 1))
        update_bn(loader, model)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in state}


def has_batchnorm(judge: Judge) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in judge.model.modules())


def check_related(judge: Judge, sources: Sequence[Source], labels: Sequence[str]) -> dict[str, Any]:
    """Refuse (UsageError) when the midpoint of the first ingredient and another scores far
    worse than both on a few held-out batches: they do not share a starting point."""
    first = read_state(sources[0])
    loss_a = judge.score(first, batches=CHECK_BATCHES)["eval/loss"]
    pairs = []
    for source, label in zip(sources[1:], labels[1:], strict=True):
        other = read_state(source)
        loss_b = judge.score(other, batches=CHECK_BATCHES)["eval/loss"]
        mid = judge.score(mean_state([first, other]), batches=CHECK_BATCHES)["eval/loss"]
        pairs.append({"with": label, "loss_a": loss_a, "loss_b": loss_b, "loss_mid": mid})
        if mid > UNRELATED_FACTOR * max(loss_a, loss_b) + UNRELATED_MARGIN:
            raise UsageError(
                f"{labels[0]} and {label} look unrelated: their midpoint has held-out loss "
                f"{mid:.3g} vs {loss_a:.3g} and {loss_b:.3g}; soups need one shared starting "
                "point (pass --allow-unrelated to soup them anyway)"
            )
    return {"method": "midpoint", "pairs": pairs}


def _run_config(run_url: str, storage: StorageOptions | None) -> Any:
    from orchestrator import config
    from orchestrator.storage import Store

    store = Store(run_url, storage)
    try:
        raw = store.read_bytes("config.yaml")
    except FileNotFoundError:
        raise UsageError(
            f"{store.path()} has no config.yaml: greedy, learned and --report need the run's task"
        ) from None
    with tempfile.TemporaryDirectory(prefix="stockpot-soup-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "wb") as f:
            f.write(raw)
        try:
            return config.load(path)
        except ConfigError as exc:
            raise ConfigError(f"{store.path('config.yaml')}: {exc}") from None
