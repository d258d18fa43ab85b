"""A user's own training script as the job's entry point (`entrypoint: mypkg.train:main`).

`check` runs where the job is launched (`stockpot run`/`submit`), before any rank starts: the
module must import and the function must take the Config. `run` calls it on every rank; the
script trains through `orchestrator.training(cfg)`, whose outcome decides the exit code (75:
stopped by a signal after saving, so the job requeues).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import Config
    from orchestrator.env import DistEnv
    from orchestrator.loop import Outcome


def resolve(spec: str) -> Callable[[Any], Any]:
    """The function `spec` ('package.module:function') names; a ConfigError in one line when
    it does not import or does not take one argument. The working directory is importable, as
    it is for the ranks (`python -m` puts it first on their path)."""
    module_name, _, name = spec.partition(":")
    where = _importable_from_here(spec)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise _no_module(where, exc.name) from None
    except Exception as exc:  # the script's own import-time error
        why = f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"{where}: importing {module_name} failed: {why}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{where}: {module_name} has no function {name!r}")
    signature = inspect.signature(function)
    try:
        signature.bind(object())
    except TypeError:
        shown = signature.replace(return_annotation=inspect.Signature.empty)
        raise _not_one_argument(where, f"{name}{shown}") from None
    return function


def check(cfg: Config) -> None:
    """Before any rank starts: the entry point's module exists and its function takes the
    Config. Read from the source when the function is a plain `def` there, so the launcher does
    not import the script (and torch, and whatever it imports) on the login node; imported
    otherwise. An error at import shows on the ranks, as one line too."""
    if cfg.entrypoint is None:
        return
    module_name, _, name = cfg.entrypoint.partition(":")
    where = _importable_from_here(cfg.entrypoint)
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError as exc:  # a parent package is missing
        spec, missing = None, exc.name
    else:
        missing = module_name
    if spec is None:
        raise _no_module(where, missing)
    function = _function_def(spec.origin, name)
    if function is None:  # not a plain def in a source file: import it
        resolve(cfg.entrypoint)
        return
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    required = len(positional) - len(args.defaults)
    kw_required = [
        a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None
    ]
    if required > 1 or (not positional and args.vararg is None) or kw_required:
        raise _not_one_argument(where, f"{name}({ast.unparse(args)})")


def _importable_from_here(spec: str) -> str:
    """Put the working directory on the path, as `python -m` does for the ranks; the label of
    the entry point in error lines."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return f"entrypoint {spec!r}"


def _no_module(where: str, name: str | None) -> ConfigError:
    return ConfigError(
        f"{where}: no module named {name!r}; run from the directory that holds it or "
        "pip install its package"
    )


def _not_one_argument(where: str, shown: str) -> ConfigError:
    name = shown.partition("(")[0]
    return ConfigError(
        f"{where}: {shown} must take one argument, the Config (def {name}(cfg): ...)"
    )


def _function_def(origin: str | None, name: str) -> ast.FunctionDef | None:
    """The module-level `def name` in the source file `origin`, or None (no source, or the name
    is bound another way: an import, an assignment, a decorator that may change it)."""
    if not origin or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_text(), origin)
    except (OSError, SyntaxError, ValueError):
        return None  # importing it says what is wrong
    defs = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == name and not node.decorator_list
    ]
    return defs[-1] if defs else None


def run(cfg: Config, env: DistEnv) -> Outcome:
    """Call the entry point on this rank; how its `training()` block ended."""
    from orchestrator import api

    assert cfg.entrypoint is not None
    function = resolve(cfg.entrypoint)
    before = api.last_outcome()
    function(cfg)
    outcome = api.last_outcome()
    if outcome is None or outcome is before:
        raise ConfigError(
            f"entrypoint {cfg.entrypoint!r} returned without training: wrap its loop in "
            "`with orchestrator.training(cfg) as t:`"
        )
    return outcome
