"""Loading: YAML + overrides -> OmegaConf merge + interpolation -> plain dict -> dataclasses.

The only OmegaConf importer. OmegaConf does the parsing, merging and `${...}` interpolation at
the edge; what leaves this module is plain frozen dataclasses (picklable, no DictConfig), so a
submitit job never carries OmegaConf objects and no code deep inside reads a mutable config.
`to_yaml` is the way back: the resolved config as a run's `config.yaml`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from orchestrator.config.hashing import config_hash
from orchestrator.config.schema import Config, TaskConfig, _yaml_key
from orchestrator.config.sweeps import sweep_label, sweep_run_dir
from orchestrator.errors import ConfigError, require


def load(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Load a config file (None: the defaults) with `key=value` overrides applied on top."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(
            OmegaConf.create(Config().to_dict()),
            _load_yaml(path) if path else OmegaConf.create({}),
            _parse_overrides(overrides),
        )
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {_one_line(exc)}") from None
    assert isinstance(data, dict)
    return from_dict({str(k): v for k, v in data.items()})


def _load_yaml(path: str, depth: int = 0) -> Any:
    """Load one YAML file, first merging the files its `defaults:` list names (relative to it)."""
    from omegaconf import OmegaConf

    require(depth < 8, f"{path}: `defaults:` nest deeper than 8 levels (a cycle?)")
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as exc:  # yaml.YAMLError and friends: report, don't trace back
        raise ConfigError(f"cannot parse {path}: {_one_line(exc)}") from None
    require(
        OmegaConf.is_dict(loaded), f"{path} must hold a mapping of sections (run:, trainer:, ...)"
    )
    names = loaded.pop("defaults", [])  # type: ignore[call-arg,arg-type]  # a DictConfig here
    require(
        OmegaConf.is_list(names) or isinstance(names, list),
        f"{path}: `defaults:` must be a list of config files, e.g. [launcher/slurm, storage/s3]",
    )
    base = os.path.dirname(path)
    parts = [_load_yaml(_default_path(base, str(name)), depth + 1) for name in names]
    return OmegaConf.merge(*parts, loaded)


def _default_path(base: str, name: str) -> str:
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    return os.path.join(base, name)


def _parse_overrides(overrides: Sequence[str]) -> Any:
    from omegaconf import OmegaConf

    for item in overrides:
        key, sep, _ = item.partition("=")
        require(
            bool(sep) and bool(key.strip()),
            f"override {item!r} is not key=value; write e.g. trainer.max_steps=200",
        )
    return OmegaConf.from_dotlist(list(overrides))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from plain data (as written by `to_dict`)."""
    return _build(Config, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    label = where or "top level"
    require(
        isinstance(data, Mapping),
        f"{label} must be a mapping of keys (got {type(data).__name__}: {data!r})",
    )
    if cls is TaskConfig:
        return _build_task(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "target" in fields:  # `optim._target_`, `scheduler._target_` (see schema._yaml_key)
        require("target" not in data, f"unknown config key '{_join(where, 'target')}'; "
                f"write {_join(where, '_target_')}")  # fmt: skip
        data = {("target" if k == "_target_" else k): v for k, v in data.items()}
    for key in data:
        require(
            key in fields,
            f"unknown config key '{_join(where, str(key))}'; valid keys at {label}: "
            + ", ".join(sorted(map(_yaml_key, fields))),
        )
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(hints[key], value, _join(where, key)) for key, value in data.items()}
    return cls(**kwargs)


def _build_task(data: Mapping[str, Any], where: str) -> TaskConfig:
    params = {k: v for k, v in data.items() if k != "_target_"}
    target = data.get("_target_", TaskConfig.target)
    require(isinstance(target, str), f"{where}._target_ must be an import path string")
    return TaskConfig(target=target, params=params)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against the type hint `hint`; return it in the dataclass's own form."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is Literal:
        require(
            value in args,
            f"{key} must be one of {', '.join(map(str, args))} (got {value!r})",
        )
        return value
    if origin is tuple:
        require(isinstance(value, list | tuple), f"{key} must be a list (got {value!r})")
        inner_types = args if args[-1] is not Ellipsis else (args[0],) * len(value)
        require(
            len(inner_types) == len(value),
            f"{key} must be a list of {len(inner_types)} items (got {value!r})",
        )
        return tuple(
            _coerce(t, v, f"{key}[{i}]")
            for i, (t, v) in enumerate(zip(inner_types, value, strict=True))
        )
    if origin is Mapping or hint is Mapping:
        require(isinstance(value, Mapping), f"{key} must be a mapping (got {value!r})")
        return dict(value)
    return _coerce_scalar(hint, value, key)


def _coerce_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    ok = isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
    require(ok, f"{key} must be {names.get(hint, hint)} (got {value!r})")
    return value


def expand_sweep(cfg: Config) -> list[Config]:
    """The elements of `cfg.sweep`: its cartesian product in key order (the last key varies
    fastest), each a validated Config without a sweep and with its own run.dir; [cfg] when
    there is no sweep."""
    if not cfg.sweep:
        return [cfg]
    keys = list(cfg.sweep)
    base = cfg.to_dict()
    base["sweep"] = {}
    elements = []
    for index, combo in enumerate(itertools.product(*(cfg.sweep[k] for k in keys))):
        chosen = dict(zip(keys, combo, strict=True))
        data = copy.deepcopy(base)
        for key, value in chosen.items():
            _set_dotted(data, key, value)
        data["run"]["dir"] = sweep_run_dir(cfg.run.dir, index, chosen)
        try:
            elements.append(from_dict(data))
        except ConfigError as exc:
            raise ConfigError(f"sweep element {index} ({sweep_label(chosen)}): {exc}") from None
    return elements


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, headed by its hash (what `config.yaml` of a run holds)."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict()))
    return f"# stockpot resolved config; hash {config_hash(cfg)}\n{body}"
