"""Sweeps: a cartesian product of config values, one run (and run.dir) per element.

What a sweep may vary and how its elements' run dirs are named. Building the elements is
`loading.expand_sweep` (it validates each like any config); the schema checks its `sweep` field
here, so this module depends on nothing else of the package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from orchestrator.errors import require

# Keys a sweep may not vary, and why.
_NOT_SWEEPABLE = {
    "run.dir": "every element gets its own run.dir under it",
    "launcher": "one array job shares one launcher (resources, requeue budget)",
    "soup": "one chained job serves the whole sweep",
    "sweep": "sweeps do not nest",
}


def check_sweep(
    sweep: Mapping[str, Any], schema_keys: frozenset[str]
) -> dict[str, tuple[Any, ...]]:
    """Flatten nested keys ({optim: {lr: [..]}} -> optim.lr) and check keys and values against
    the schema's dotted keys (`task.*` is free-form: the task checks its own parameters)."""
    flat = _flatten_sweep(sweep, "")
    for key, values in flat.items():
        for fixed, why in _NOT_SWEEPABLE.items():
            require(
                not (key == fixed or key.startswith(fixed + ".")),
                f"sweep.{key}: {fixed} cannot be swept ({why})",
            )
        require(
            key.startswith("task.") or key in schema_keys,
            f"sweep.{key}: unknown config key '{key}'; sweep keys are dotted config keys "
            "such as optim.lr, run.seed or task.<param>",
        )
        require(
            isinstance(values, list | tuple) and len(values) > 0,
            f"sweep.{key} must be a non-empty list of values (got {values!r}), "
            f"e.g. sweep: {{{key}: [a, b]}}",
        )
    return {key: tuple(values) for key, values in flat.items()}


def _flatten_sweep(data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        out.update(
            _flatten_sweep(value, full + ".") if isinstance(value, Mapping) else {full: value}
        )
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_LABEL = 120


def sweep_label(chosen: Mapping[str, Any]) -> str:
    """`optim.lr=0.001,run.seed=0`, with anything a path or a shell would trip on as `_`."""
    parts = [_UNSAFE.sub("_", f"{key}={_label_value(value)}") for key, value in chosen.items()]
    return ",".join(parts)[:_MAX_LABEL]


def _label_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "_".join(_label_value(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def sweep_run_dir(root: str, index: int, chosen: Mapping[str, Any]) -> str:
    """`<root>/<index>-<label>`: the index keeps names unique even when labels are truncated."""
    return f"{root.rstrip('/')}/{index}-{sweep_label(chosen)}"
