"""Bundled example tasks, and turning `task._target_` plus its keyword arguments into a task.

A task is any object with the methods of `orchestrator.tasks.base.Task`; the config names its
factory by import path (`task._target_`) and every other key of the `task:` block is passed to
that factory as a keyword argument.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from orchestrator.errors import ConfigError, require


def import_target(path: str) -> Any:
    """The object `pkg.mod.Attr` names; a ConfigError (one line) if it cannot be found."""
    module_name, _, attr = path.rpartition(".")
    require(
        bool(module_name) and bool(attr),
        f"task._target_ must be an import path like 'package.module.Factory' (got {path!r})",
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"task._target_ {path!r}: no module {module_name!r}") from None
        # The module exists but one of its own imports is missing: say which.
        raise ConfigError(
            f"task._target_ {path!r}: importing {module_name!r} failed: {exc}"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(
            f"task._target_ {path!r}: {module_name!r} has no attribute {attr!r}"
        ) from None


def build_task(target: str, params: Mapping[str, Any]) -> Any:
    """Call the factory `target` with `params`; unknown or missing keys are ConfigErrors."""
    factory = import_target(target)
    require(callable(factory), f"task._target_ {target!r} is not callable")
    _check_params(target, factory, params)
    return factory(**params)


def _check_params(target: str, factory: Any, params: Mapping[str, Any]) -> None:
    """Check the keys against the factory's signature before calling it, so a TypeError raised
    inside the factory is never mistaken for a config mistake."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {name: p for name, p in signature.parameters.items() if p.kind in kinds}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        unknown: list[str] = []
    else:
        unknown = [key for key in params if key not in accepted]
    listing = ", ".join(accepted) or "none"
    if unknown:
        raise ConfigError(
            f"unknown task parameter 'task.{unknown[0]}' for {target}; accepted: {listing}"
        )
    missing = [name for name, p in accepted.items() if p.default is p.empty and name not in params]
    if missing:
        raise ConfigError(f"task.{missing[0]} is required by {target}; accepted: {listing}")
