"""The two records a soup is made of: the `Kitchen` (ingredients, opened and checked) and the
`Mixture` (what the recipe decided to mix). Plain data, shared by cook and provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from orchestrator.config import SoupConfig
    from orchestrator.soup.evaluate import Judge
    from orchestrator.soup.ingredients import Ingredient
    from orchestrator.soup.reader import Source
    from orchestrator.soup.user_eval import UserJudge
    from orchestrator.storage import StorageOptions


@dataclass
class Kitchen:
    """What a soup is made from, after the pre-flight checks."""

    cfg: SoupConfig
    storage: StorageOptions | None
    ingredients: list[Ingredient]
    sources: list[Source]
    out: str
    timings: dict[str, float] = field(default_factory=dict)
    judge: Judge | UserJudge | None = None  # UserJudge: soup.eval_cmd / eval_hook


@dataclass
class Mixture:
    """What the recipe decided: a weighted mean of `sources` to stream (weights None: uniform),
    or a state already mixed in memory (`learned` per layer)."""

    sources: list[Source]
    weights: list[float] | None = None
    state: dict[str, torch.Tensor] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    ingredient_scores: list[dict[str, float]] = field(default_factory=list)
