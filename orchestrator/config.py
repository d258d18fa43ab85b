"""The run config: a YAML file plus `key=value` overrides, resolved into frozen dataclasses.

The only OmegaConf importer. OmegaConf does the parsing, merging and `${...}` interpolation at
the edge; what leaves this module is plain frozen dataclasses (picklable, no DictConfig), so a
submitit job never carries OmegaConf objects and no code deep inside reads a mutable config.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_or_none(value: float | None, key: str, off_hint: str = "null to disable") -> None:
    _require(value is None or value > 0, f"{key} must be > 0 (got {value}); use {off_hint}")


@dataclass(frozen=True)
class RunConfig:
    # Where everything of the run lives: a local path or an `s3://bucket/prefix` URL.
    dir: str = "runs/${run.name}"
    # A short name for logs, job names and the default run.dir.
    name: str = "demo"
    # Seeds every RNG (python, numpy, torch) of every rank, offset by rank where it must differ.
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            bool(self.dir), "run.dir must not be empty; give a local path or s3://bucket/prefix"
        )
        _require(bool(self.name), "run.name must not be empty")
        _require(self.seed >= 0, f"run.seed must be >= 0 (got {self.seed})")


@dataclass(frozen=True)
class TaskConfig:
    # Import path of the task factory, e.g. `orchestrator.tasks.synthetic.SyntheticClassification`.
    # Every other key of the `task:` block is passed to it as a keyword argument.
    target: str = "orchestrator.tasks.synthetic.SyntheticClassification"
    # The task's own keyword arguments (free-form: the task validates them).
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module, _, attr = self.target.rpartition(".")
        _require(
            bool(module) and bool(attr),
            f"task._target_ must be an import path like 'package.module.Factory' (got {self.target!r})",
        )


@dataclass(frozen=True)
class ModelConfig:
    # Start from pretrained weights: a committed checkpoint, a run dir (its latest), or a
    # .safetensors file, local or s3://. Ignored once the run has checkpoints of its own.
    init_from: str | None = None


@dataclass(frozen=True)
class TrainerConfig:
    # Optimizer steps to train for; the run exits 0 once reached (may grow between resumes).
    max_steps: int = 100
    # Local ranks `stockpot run` spawns outside Slurm/torchrun (like `torchrun --standalone`).
    nproc: int = 1
    # Data parallelism: `ddp` (DistributedDataParallel) or `fsdp` (FSDP2 fully_shard).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Samples per rank per micro-batch.
    batch_size: int = 32
    # Micro-batches accumulated into one optimizer step.
    grad_accum_steps: int = 1
    # Clip the global gradient norm to this value; null disables clipping.
    grad_clip: float | None = None
    # `bf16` autocasts (FSDP2: a bf16 MixedPrecisionPolicy); `no` trains in float32.
    mixed_precision: Literal["no", "bf16"] = "no"
    # Log a progress line (rank 0) and aggregated metrics every N steps.
    log_every: int = 10
    # Evaluate on the held-out split every N steps; null evaluates only at the end.
    eval_every: int | None = None
    # `auto` picks cuda when available, else cpu (gloo).
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        _require(self.max_steps >= 0, f"trainer.max_steps must be >= 0 (got {self.max_steps})")
        _require(self.nproc >= 1, f"trainer.nproc must be >= 1 (got {self.nproc})")
        _require(self.batch_size >= 1, f"trainer.batch_size must be >= 1 (got {self.batch_size})")
        _require(
            self.grad_accum_steps >= 1,
            f"trainer.grad_accum_steps must be >= 1 (got {self.grad_accum_steps})",
        )
        _positive_or_none(self.grad_clip, "trainer.grad_clip")
        _require(self.log_every >= 1, f"trainer.log_every must be >= 1 (got {self.log_every})")
        _positive_or_none(self.eval_every, "trainer.eval_every", "null to evaluate only at the end")


@dataclass(frozen=True)
class OptimConfig:
    # `adamw` or `sgd`.
    name: Literal["adamw", "sgd"] = "adamw"
    # Peak learning rate (reached after the scheduler's warmup).
    lr: float = 1e-3
    # Decoupled (adamw) or L2 (sgd) weight decay.
    weight_decay: float = 0.0
    # Adam's (beta1, beta2).
    betas: tuple[float, float] = (0.9, 0.999)
    # SGD momentum.
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0 (got {self.lr})")
        _require(
            self.weight_decay >= 0, f"optim.weight_decay must be >= 0 (got {self.weight_decay})"
        )
        _require(
            all(0 <= b < 1 for b in self.betas),
            f"optim.betas must both be in [0, 1) (got {list(self.betas)})",
        )
        _require(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1) (got {self.momentum})")


@dataclass(frozen=True)
class SchedulerConfig:
    # `cosine` (linear warmup then cosine decay to min_lr_ratio x lr) or `constant` (after warmup).
    name: Literal["cosine", "constant"] = "cosine"
    # Steps of linear warmup from 0 to optim.lr.
    warmup_steps: int = 0
    # Floor of the cosine decay, as a fraction of optim.lr.
    min_lr_ratio: float = 0.0
    # Steps over which the cosine decays; null: trainer.max_steps as of the run's first start
    # (kept on resume, so raising max_steps later does not bend the schedule already followed).
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        _require(
            self.warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0 (got {self.warmup_steps})"
        )
        _require(
            0 <= self.min_lr_ratio <= 1,
            f"scheduler.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})",
        )
        _positive_or_none(self.decay_steps, "scheduler.decay_steps", "null for trainer.max_steps")


@dataclass(frozen=True)
class KeepBestConfig:
    # Metric name from eval (e.g. `eval/loss`); null disables keep-best retention.
    metric: str | None = None
    # `min` keeps the lowest values, `max` the highest.
    mode: Literal["min", "max"] = "min"
    # How many best checkpoints to keep.
    k: int = 1

    def __post_init__(self) -> None:
        _require(self.k >= 1, f"checkpoint.keep_best.k must be >= 1 (got {self.k})")


@dataclass(frozen=True)
class CheckpointConfig:
    # Save every N optimizer steps; null disables step-based saves.
    every_steps: int | None = 50
    # Save at the end of every N epochs; null disables.
    every_epochs: int | None = None
    # Save when N minutes have passed since the last save; null disables.
    every_minutes: float | None = None
    # Keep the newest N committed checkpoints; null keeps all (the newest is never deleted).
    keep_last: int | None = 3
    # Also keep the k best by an eval metric.
    keep_best: KeepBestConfig = field(default_factory=KeepBestConfig)
    # Also keep every checkpoint whose step is a multiple of N (milestones); null disables.
    keep_every_steps: int | None = None
    # Stage to host memory, then write and commit in the background (one save in flight).
    async_save: bool = False
    # On resume, verify checksums of the chosen checkpoint (sizes are always checked).
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        _positive_or_none(self.every_steps, "checkpoint.every_steps")
        _positive_or_none(self.every_epochs, "checkpoint.every_epochs")
        _positive_or_none(self.every_minutes, "checkpoint.every_minutes")
        _positive_or_none(self.keep_last, "checkpoint.keep_last", "null to keep every checkpoint")
        _positive_or_none(self.keep_every_steps, "checkpoint.keep_every_steps")


@dataclass(frozen=True)
class S3Config:
    # S3-compatible endpoint (MinIO, moto, ...); null uses AWS_ENDPOINT_URL or AWS itself.
    endpoint_url: str | None = None
    # Region; null uses AWS_REGION / AWS_DEFAULT_REGION.
    region: str | None = None
    # Named profile from ~/.aws; null uses AWS_PROFILE or the default chain.
    profile: str | None = None
    # Attempts per operation on transient errors (5xx, throttling, connection resets).
    max_attempts: int = 5

    def __post_init__(self) -> None:
        _require(
            self.max_attempts >= 1,
            f"storage.s3.max_attempts must be >= 1 (got {self.max_attempts})",
        )


@dataclass(frozen=True)
class StorageConfig:
    # Settings for s3:// run dirs. Credentials come only from the standard AWS variables/files.
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class LauncherConfig:
    # `local` runs here (spawned ranks); `slurm` submits through submitit.
    kind: Literal["local", "slurm"] = "local"
    # Slurm nodes.
    nodes: int = 1
    # Ranks per node.
    tasks_per_node: int = 1
    # CPU cores per rank.
    cpus_per_task: int = 1
    # GPUs per node (0 on CPU clusters).
    gpus_per_node: int = 0
    # Memory per node in GB; null uses the partition's default.
    mem_gb: float | None = None
    # Wall-clock limit of one run of the job, in minutes.
    timeout_min: int = 60
    # Slurm partition; null uses the cluster's default.
    partition: str | None = None
    # Seconds before the time limit that Slurm sends USR2, so the job can save and requeue.
    signal_delay_s: int = 120
    # Slurm account to charge; null leaves it unset.
    account: str | None = None
    # Slurm QoS; null leaves it unset.
    qos: str | None = None
    # Slurm node feature constraint (e.g. `a100`); null leaves it unset.
    constraint: str | None = None
    # Ask for whole nodes.
    exclusive: bool = False
    # Shell lines run in the sbatch script before the job (module loads, env vars).
    setup: tuple[str, ...] = ()
    # Extra sbatch parameters passed through verbatim (e.g. {"reservation": "x"}).
    additional_parameters: Mapping[str, Any] = field(default_factory=dict)
    # How many times the job may requeue itself after preemption or time-out.
    max_requeues: int = 3
    # Where submitit writes job scripts, pickles and logs (a shared filesystem path).
    log_dir: str = "slurm_logs/${run.name}"

    def __post_init__(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            value = getattr(self, key)
            _require(value >= 1, f"launcher.{key} must be >= 1 (got {value})")
        _require(
            self.gpus_per_node >= 0,
            f"launcher.gpus_per_node must be >= 0 (got {self.gpus_per_node})",
        )
        _positive_or_none(self.mem_gb, "launcher.mem_gb", "null for the partition default")
        _require(
            self.signal_delay_s >= 0,
            f"launcher.signal_delay_s must be >= 0 (got {self.signal_delay_s})",
        )
        _require(
            self.max_requeues >= 0, f"launcher.max_requeues must be >= 0 (got {self.max_requeues})"
        )


@dataclass(frozen=True)
class ResumeConfig:
    # Resume even if the config changed in a way that changes the computation (e.g. optim.lr).
    allow_config_change: bool = False


@dataclass(frozen=True)
class SoupConfig:
    # After training, merge checkpoints into a model soup in a dependent job.
    enabled: bool = False
    # How to merge: `uniform` average, `greedy` (add while held-out score improves), `learned`.
    recipe: Literal["uniform", "greedy", "learned"] = "uniform"
    # Name of the soup; it is written to <run.dir>/soups/<name>/.
    name: str = "soup"


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    # A sweep: dotted config keys -> lists of values, e.g. {optim.lr: [1e-3, 3e-3], run.seed:
    # [0, 1]}. `stockpot submit` runs their cartesian product as ONE Slurm array, each element
    # in its own <run.dir>/<index>-<key>=<value>,... (`expand_sweep`); empty: a single run.
    # Elements carry no sweep, so it never enters their resume drift check.
    sweep: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sweep", _check_sweep(self.sweep))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data; `from_dict(to_dict())` gives back an equal config."""
        return _to_plain(self)


# --------------------------------------------------------------------------------------------
# Sweeps: a cartesian product of config values, one run (and run.dir) per element.

# Keys a sweep may not vary, and why.
_NOT_SWEEPABLE = {
    "run.dir": "every element gets its own run.dir under it",
    "launcher": "one array job shares one launcher (resources, requeue budget)",
    "soup": "one chained job serves the whole sweep",
    "sweep": "sweeps do not nest",
}


def _check_sweep(sweep: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """Flatten nested keys ({optim: {lr: [..]}} -> optim.lr) and check keys and values."""
    flat = _flatten_sweep(sweep, "")
    for key, values in flat.items():
        for fixed, why in _NOT_SWEEPABLE.items():
            _require(
                not (key == fixed or key.startswith(fixed + ".")),
                f"sweep.{key}: {fixed} cannot be swept ({why})",
            )
        _require(
            key.startswith("task.") or key in _sweepable_keys(),
            f"sweep.{key}: unknown config key '{key}'; sweep keys are dotted config keys "
            "such as optim.lr, run.seed or task.<param>",
        )
        _require(
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


@functools.cache
def _sweepable_keys() -> frozenset[str]:
    return frozenset(_flatten(Config().to_dict()))


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


# --------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> OmegaConf merge + interpolation -> plain dict -> dataclasses.


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

    _require(depth < 8, f"{path}: `defaults:` nest deeper than 8 levels (a cycle?)")
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except Exception as exc:  # yaml.YAMLError and friends: report, don't trace back
        raise ConfigError(f"cannot parse {path}: {_one_line(exc)}") from None
    _require(
        OmegaConf.is_dict(loaded), f"{path} must hold a mapping of sections (run:, trainer:, ...)"
    )
    names = loaded.pop("defaults", [])  # type: ignore[call-arg,arg-type]  # a DictConfig here
    _require(
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
        _require(
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
    _require(
        isinstance(data, Mapping),
        f"{label} must be a mapping of keys (got {type(data).__name__}: {data!r})",
    )
    if cls is TaskConfig:
        return _build_task(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        _require(
            key in fields,
            f"unknown config key '{_join(where, str(key))}'; valid keys at {label}: "
            + ", ".join(sorted(fields)),
        )
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(hints[key], value, _join(where, key)) for key, value in data.items()}
    return cls(**kwargs)


def _build_task(data: Mapping[str, Any], where: str) -> TaskConfig:
    params = {k: v for k, v in data.items() if k != "_target_"}
    target = data.get("_target_", TaskConfig.target)
    _require(isinstance(target, str), f"{where}._target_ must be an import path string")
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
        _require(
            value in args,
            f"{key} must be one of {', '.join(map(str, args))} (got {value!r})",
        )
        return value
    if origin is tuple:
        _require(isinstance(value, list | tuple), f"{key} must be a list (got {value!r})")
        inner_types = args if args[-1] is not Ellipsis else (args[0],) * len(value)
        _require(
            len(inner_types) == len(value),
            f"{key} must be a list of {len(inner_types)} items (got {value!r})",
        )
        return tuple(
            _coerce(t, v, f"{key}[{i}]")
            for i, (t, v) in enumerate(zip(inner_types, value, strict=True))
        )
    if origin is Mapping or hint is Mapping:
        _require(isinstance(value, Mapping), f"{key} must be a mapping (got {value!r})")
        return dict(value)
    return _coerce_scalar(hint, value, key)


def _coerce_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    ok = isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
    _require(ok, f"{key} must be {names.get(hint, hint)} (got {value!r})")
    return value


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, TaskConfig):
        return {"_target_": obj.target, **_to_plain(dict(obj.params))}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Hashing and writing next to a run.


def config_hash(cfg: Config) -> str:
    """A stable hash of the resolved config: sha256 of its canonical JSON, 16 hex digits."""
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# Keys that never change what a step computes: resuming with other values is always fine.
# (trainer.nproc changes the world size: resume supports it and continues at the same global
# sample index; model.init_from is ignored once a run has checkpoints of its own.)
_NON_COMPUTATIONAL = (
    "run.dir", "run.name", "trainer.max_steps", "trainer.nproc", "trainer.log_every",
    "trainer.eval_every", "trainer.device", "model.init_from", "checkpoint", "storage",
    "launcher", "resume", "soup", "sweep",
)  # fmt: skip


def computation_view(cfg: Config) -> dict[str, Any]:
    """The flattened config keys that change the computation (what a resume must match)."""
    flat = _flatten(cfg.to_dict())
    return {
        k: v for k, v in flat.items()
        if not any(k == skip or k.startswith(skip + ".") for skip in _NON_COMPUTATIONAL)
    }  # fmt: skip


def diff_views(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for every key that differs (missing shown as <unset>)."""
    keys = sorted(set(old) | set(new))
    unset = "<unset>"
    return [
        f"{k}: {old.get(k, unset)!r} -> {new.get(k, unset)!r}"
        for k in keys
        if old.get(k, unset) != new.get(k, unset)
    ]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, headed by its hash (what `config.yaml` of a run holds)."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict()))
    return f"# stockpot resolved config; hash {config_hash(cfg)}\n{body}"
