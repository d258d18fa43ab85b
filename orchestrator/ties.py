"""Tied parameters: one tensor known by several names (e.g. GPT-2's input embedding and LM head).

`ModelAndOptimizer` records the ties of the model beside its state (`<name>.tied`: groups of
names, owner first), because a checkpoint alone cannot tell a tie from two equal tensors. The
owner is the name `named_parameters()` yields first, the one `save_pretrained` keeps too; the
others are aliases. `stockpot export` writes each tie once, under its owner's name, and the
library's loader re-ties the rest (safetensors refuses two names sharing memory anyway).

No torch import here: `stockpot export` reads the ties without building the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

TIED_KEY = "tied"  # beside `model` and `optim` in ModelAndOptimizer's state


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Every group of names one parameter object goes by, in `named_parameters` order; only
    groups of two or more."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return [group for group in by_param.values() if len(group) > 1]


def aliases(groups: Iterable[Sequence[str]]) -> dict[str, str]:
    """alias -> owner: every name of a tie but its first."""
    return {alias: group[0] for group in groups for alias in group[1:]}


def truly_missing(missing: Iterable[str], groups: Iterable[Sequence[str]]) -> list[str]:
    """The names of `missing` (from `load_state_dict(strict=False)`) that did not get a value
    through another name of their tie."""
    missing = list(missing)
    absent = set(missing)
    loaded_via_tie = {name for group in groups if not absent.issuperset(group) for name in group}
    return [name for name in missing if name not in loaded_via_tie]
