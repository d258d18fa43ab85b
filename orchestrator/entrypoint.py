"""A user's own training script as the job's entry point (`entrypoint: mypkg.train:main`).

`check` runs where the job is launched (`stockpot run`/`submit`), before any rank starts: the
module must import and the function must take the Config. `run` calls it on every rank; the
script trains through `orchestrator.training(cfg)`, whose outcome decides the exit code (75:
stopped by a signal after saving, so the job requeues).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
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
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    where = f"entrypoint {spec!r}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{where}: no module named {exc.name!r}; run from the directory that holds it or "
            "pip install its package"
        ) from None
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
        raise ConfigError(
            f"{where}: {name}{shown} must take one argument, the Config (def {name}(cfg): ...)"
        ) from None
    return function


def check(cfg: Config) -> None:
    """Before any rank starts: the entry point imports and takes the Config."""
    if cfg.entrypoint is not None:
        resolve(cfg.entrypoint)


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
