"""Which sub-modules FSDP2 shards on their own (its units), kept apart from shared parameters.

Pure functions over a module tree, so the policy is testable without a process group:

1. `trainer.fsdp.shard_modules`, when set: class names (`[GPT2Block]`), or one import path to a
   function `policy(model) -> iterable of sub-modules`;
2. else the classes the model declares in `_no_split_modules` (the Hugging Face convention that
   accelerate's FSDP auto-wrap follows), collected from every module of the tree;
3. else the children of the largest `nn.ModuleList` whose items all have one class (the block
   list: `blocks`, `transformer.h`, `model.layers`, `encoder.layer`, ...);
4. else every direct child that holds parameters.

Whatever the source, a candidate is sharded only if every parameter under it is owned by modules
under it alone: a parameter shared with a module outside (tied embeddings) stays with the
smallest enclosing unit that holds all its owners, or with the root group. FSDP2 refuses one
parameter in two groups ("shared with a parameter already managed by another FSDP group").
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from orchestrator.errors import ConfigError
from orchestrator.ties import tied_parameters


@dataclass(frozen=True)
class ShardPlan:
    units: list[tuple[str, nn.Module]]  # (qualified name, module), deepest first
    source: str  # which rule chose the candidates
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (name, shared parameter)

    def describe(self) -> str:
        """One line for the log: how many units of which classes, and what was kept back."""
        counts = Counter(type(m).__name__ for _, m in self.units)
        kinds = ", ".join(f"{cls} x{n}" for cls, n in sorted(counts.items())) or "none"
        line = f"fsdp: {len(self.units)} units sharded on their own ({kinds}; from {self.source})"
        if self.dropped:
            kept = "; ".join(f"{name} (shares {param})" for name, param in self.dropped[:4])
            more = f" and {len(self.dropped) - 4} more" if len(self.dropped) > 4 else ""
            line += f"; kept in an enclosing group for shared parameters: {kept}{more}"
        return line + "; the rest is in the root group"


def plan(model: nn.Module, shard_modules: Sequence[str] = ()) -> ShardPlan:
    """The units to `fully_shard` before the root, deepest first (FSDP2 needs inner first)."""
    candidates, source = _candidates(model, shard_modules)
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    named = [(names[id(m)], m) for m in candidates if names.get(id(m))]  # never the root
    groups = tied_parameters(model)
    units, dropped = [], []
    for name, module in named:
        if not any(True for _ in module.parameters()):
            continue
        outside = _shared_outside(name, groups)
        if outside:
            dropped.append((name, outside))
        else:
            units.append((name, module))
    units.sort(key=lambda item: -item[0].count("."))
    return ShardPlan(units, source, dropped)


def _shared_outside(unit: str, groups: list[list[str]]) -> str | None:
    """`a = b` for a parameter under `unit` that is also owned outside it, else None."""
    prefix = unit + "."
    for group in groups:
        inside = [n for n in group if n.startswith(prefix)]
        if inside and len(inside) < len(group):
            other = next(n for n in group if not n.startswith(prefix))
            return f"{inside[0]} = {other}"
    return None


def _candidates(model: nn.Module, shard_modules: Sequence[str]) -> tuple[list[nn.Module], str]:
    if shard_modules:
        return _user_candidates(model, shard_modules)
    declared: set[str] = set()
    for module in model.modules():
        declared.update(getattr(module, "_no_split_modules", None) or ())
    if declared:
        found = [m for m in model.modules() if type(m).__name__ in declared]
        if found:
            return found, f"_no_split_modules {sorted(declared)}"
    blocks = largest_block_list(model)
    if blocks is not None:
        return list(blocks), f"the largest list of {type(blocks[0]).__name__} blocks"
    children = [m for m in model.children() if any(True for _ in m.parameters())]
    return children, "the direct children with parameters"


def largest_block_list(model: nn.Module) -> nn.ModuleList | None:
    """The `nn.ModuleList` of two or more same-class modules holding the most parameters."""
    best, best_size = None, 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = module, size
    return best


def _user_candidates(model: nn.Module, entries: Sequence[str]) -> tuple[list[nn.Module], str]:
    if len(entries) == 1 and ("." in entries[0] or ":" in entries[0]):
        return _from_policy(model, entries[0]), f"the policy {entries[0]}"
    wanted = set(entries)
    found = [m for m in model.modules() if type(m).__name__ in wanted]
    present = {type(m).__name__ for m in found}
    missing = sorted(wanted - present)
    if missing:
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(
            f"trainer.fsdp.shard_modules: no module of class {', '.join(missing)} in this model; "
            f"its classes: {', '.join(classes)}"
        )
    return found, f"trainer.fsdp.shard_modules {sorted(wanted)}"


def _from_policy(model: nn.Module, path: str) -> list[nn.Module]:
    policy = import_policy(path)
    modules = list(policy(model))
    inside = {id(m) for m in model.modules()}
    if not all(isinstance(m, nn.Module) and id(m) in inside for m in modules):
        raise ConfigError(
            f"trainer.fsdp.shard_modules: {path} must return sub-modules of the model it is given"
        )
    return modules


def import_policy(path: str) -> Callable[[nn.Module], Iterable[nn.Module]]:
    """`pkg.mod:func` or `pkg.mod.func`; a ConfigError naming what is missing otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"trainer.fsdp.shard_modules: cannot import {path!r} ({exc})") from None
    if not callable(found):
        raise ConfigError(f"trainer.fsdp.shard_modules: {path!r} is not callable")
    return found
