"""The eval-driven recipes: greedy and learned. Uniform and weighted need no code here: they
are the engine's weighted mean with equal or given weights.

greedy   ingredients sorted by their held-out score, best first; the next one joins only if
         the held-out score of the mean of the chosen set does not get worse (Wortsman et al.
         2022). Memory: a float64 running sum, one candidate and one ingredient (~4x a float32
         model); each ingredient is read once more here. Never worse than its best ingredient
         on the validation split, by construction.
learned  mixing coefficients alpha = softmax(A), starting uniform (so the soup stays convex),
         one row per ingredient (global) or per ingredient and tensor (`per_layer`), fit by
         AdamW on the task's loss over the validation split. Memory: EVERY ingredient's whole
         model at once, plus the mixed one (k + 1 models, in float32); refused up front when
         that exceeds `max_memory_gb`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchestrator.errors import UsageError
from orchestrator.soup.evaluate import Judge, State, read_state
from orchestrator.soup.reader import Source

if TYPE_CHECKING:
    from orchestrator.soup.user_eval import UserJudge

log = logging.getLogger(__name__)


@dataclass
class GreedyResult:
    order: list[int]  # ingredient indices, best first
    chosen: list[int]  # in the order they joined
    soup_scores: list[dict[str, float]] = field(default_factory=list)  # after each try
    accepted: list[bool] = field(default_factory=list)


def greedy(
    judge: Judge | UserJudge, sources: Sequence[Source], scores: Sequence[dict[str, float]]
) -> GreedyResult:
    """Greedy soup over `sources`, whose validation `scores` are already known."""
    sign = 1 if judge.mode == "min" else -1
    order = sorted(range(len(sources)), key=lambda i: (sign * judge.value(scores[i]), i))
    result = GreedyResult(order, [order[0]])
    total = _to_f64(read_state(sources[order[0]]))
    first_ints = {k: v for k, v in total.items() if not v.dtype.is_floating_point}
    best = judge.value(scores[order[0]])
    for i in order[1:]:
        other = read_state(sources[i])
        n = len(result.chosen) + 1
        candidate = _candidate(total, other, n, first_ints, sources[0])
        got = judge.score(candidate)
        ok = judge.better_or_equal(judge.value(got), best)
        result.soup_scores.append(got)
        result.accepted.append(ok)
        log.info("greedy: %s %s (%s %.5g vs best %.5g)", "added" if ok else "skipped",
                 sources[i].ingredient.label, judge.metric, judge.value(got), best)  # fmt: skip
        if ok:
            result.chosen.append(i)
            best = judge.value(got)
            for name, tensor in other.items():
                if tensor.dtype.is_floating_point:
                    total[name].add_(tensor)
    return result


def _to_f64(state: State) -> State:
    return {k: v.double() if v.dtype.is_floating_point and v.dtype.itemsize >= 4
            else v.float() if v.dtype.is_floating_point else v for k, v in state.items()}  # fmt: skip


def _candidate(total: State, other: State, n: int, ints: State, like: Source) -> State:
    """(total + other) / n, cast to each tensor's own dtype; ints from the first chosen."""
    out: State = {}
    for name, acc in total.items():
        dtype = like.specs[name].dtype
        if not dtype.is_floating_point:
            out[name] = ints[name]
        else:
            out[name] = ((acc + other[name]) / n).to(dtype)
    return out


@dataclass
class LearnedResult:
    weights: list[float] | None  # global: one per ingredient
    per_layer: dict[str, list[float]] | None  # per tensor: one per ingredient
    state: State | None  # per-layer: the mixed model (already in memory)
    losses: list[float] = field(default_factory=list)  # mean loss per epoch


def learned_memory(sources: Sequence[Source]) -> int:
    """Bytes `learned` holds: every ingredient in float32, plus the mixed model."""
    numel = sum(spec.nbytes // spec.dtype.itemsize for spec in sources[0].specs.values())
    return numel * 4 * (len(sources) + 1)


def learned(judge: Judge, sources: Sequence[Source], *, per_layer: bool, epochs: int,
            lr: float, max_memory_gb: float | None) -> LearnedResult:  # fmt: skip
    need = learned_memory(sources)
    if max_memory_gb is not None and need > max_memory_gb * 1e9:
        raise UsageError(
            f"learned needs every ingredient in memory at once: {need / 1e9:.2f} GB for "
            f"{len(sources)} ingredients, over --max-memory {max_memory_gb} GB; use fewer "
            "ingredients, greedy, or raise the bound"
        )
    states = [read_state(s) for s in sources]
    names = [n for n, t in states[0].items() if t.dtype.is_floating_point]
    stacked = {n: torch.stack([s[n].float() for s in states]) for n in names}
    ints = {n: t for n, t in states[0].items() if not t.dtype.is_floating_point}
    del states
    k = len(sources)
    logits = nn.Parameter(torch.zeros(len(names) if per_layer else 1, k))
    opt = torch.optim.AdamW([logits], lr=lr, weight_decay=0.0)
    mixed_model = _Mixed(judge.model)
    data = judge.task.eval_set()
    from orchestrator.tasks.base import eval_batches

    losses = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for indices in eval_batches(len(data), judge.batch_size, 0, 1):
            if len(indices) == 0:
                continue
            mixed_model.tensors = {**ints, **_mix(stacked, names, logits)}
            loss = judge.task.loss(mixed_model, data.batch(indices))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(indices), count + len(indices)
        losses.append(total / max(count, 1))
    alphas = torch.softmax(logits.detach().double(), dim=-1)
    if not per_layer:
        return LearnedResult([float(a) for a in alphas[0]], None, None, losses)
    dtypes = {n: sources[0].specs[n].dtype for n in names}
    state = {n: (alphas[j][:, None] * stacked[n].reshape(k, -1).double()).sum(0)
             .reshape(stacked[n].shape[1:]).to(dtypes[n]) for j, n in enumerate(names)}  # fmt: skip
    coefficients = {n: [float(a) for a in alphas[j]] for j, n in enumerate(names)}
    return LearnedResult(None, coefficients, {**ints, **state}, losses)


def _mix(stacked: dict[str, torch.Tensor], names: list[str], logits: torch.Tensor) -> State:
    alphas = torch.softmax(logits, dim=-1)
    out = {}
    for j, name in enumerate(names):
        a = alphas[j if alphas.shape[0] > 1 else 0]
        t = stacked[name]
        out[name] = (a.view(-1, *([1] * (t.dim() - 1))) * t).sum(0)
    return out


class _Mixed(nn.Module):
    """The task's model run with the mixed tensors (torch.func.functional_call), so gradients
    reach the coefficients; task.loss(model, batch) calls it like the model itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model.eval()
        self.tensors: State = {}

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.func.functional_call(self.inner, self.tensors, args, kwargs)
