"""The config schema: frozen dataclasses, one per section, each validating itself on construction.

A comment on every field says what it does (tests hold that); the values are checked in
`__post_init__` with a one-line error that says how to fix them. Building these from YAML and
overrides is `loading`'s job; what a sweep may vary is `sweeps`'. A section whose component
reads it as it is has a module of its own (`checkpoint`, `soup`), nested here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.config.checkpoint import CheckpointConfig
from orchestrator.config.ema import check_decays
from orchestrator.config.launcher import LauncherConfig
from orchestrator.config.soup import SoupConfig
from orchestrator.config.sweeps import check_sweep
from orchestrator.errors import require
from orchestrator.storage.options import S3Options, StorageOptions
from orchestrator.storage.registry import check_url


def _positive_or_none(value: float | None, key: str, off_hint: str = "null to disable") -> None:
    require(value is None or value > 0, f"{key} must be > 0 (got {value}); use {off_hint}")


@dataclass(frozen=True)
class RunConfig:
    # Where everything of the run lives: a local path or an `s3://bucket/prefix` URL.
    dir: str = "runs/${run.name}"
    # A short name for logs, job names and the default run.dir.
    name: str = "demo"
    # Seeds every RNG (python, numpy, torch) of every rank, offset by rank where it must differ.
    seed: int = 0

    def __post_init__(self) -> None:
        require(
            bool(self.dir), "run.dir must not be empty; give a local path or s3://bucket/prefix"
        )
        check_url(self.dir, "run.dir")  # a scheme no backend serves fails here, before any job
        require(bool(self.name), "run.name must not be empty")
        require(self.seed >= 0, f"run.seed must be >= 0 (got {self.seed})")


@dataclass(frozen=True)
class TaskConfig:
    # Import path of the task factory, e.g. `orchestrator.tasks.synthetic.SyntheticClassification`.
    # Every other key of the `task:` block is passed to it as a keyword argument.
    target: str = "orchestrator.tasks.synthetic.SyntheticClassification"
    # The task's own keyword arguments (free-form: the task validates them).
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module, _, attr = self.target.rpartition(".")
        require(
            bool(module) and bool(attr),
            f"task._target_ must be an import path like 'package.module.Factory' (got {self.target!r})",
        )


@dataclass(frozen=True)
class ModelConfig:
    # Start from pretrained weights: a committed checkpoint, a run dir (its latest), or a
    # .safetensors file, local or s3://. Ignored once the run has checkpoints of its own.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.init_from:
            check_url(self.init_from, "model.init_from")


@dataclass(frozen=True)
class FsdpConfig:
    # FSDP2 units sharded on their own: module class names (e.g. [GPT2Block]), or one import
    # path to a function `policy(model) -> sub-modules`. Empty: the model's
    # `_no_split_modules`, else its largest list of same-class blocks (orchestrator/sharding.py).
    shard_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require(
            all(isinstance(m, str) and m.strip() for m in self.shard_modules),
            f"trainer.fsdp.shard_modules must be class names or one import path "
            f"(got {list(self.shard_modules)})",
        )
        paths = [m for m in self.shard_modules if "." in m or ":" in m]
        require(
            not paths or len(self.shard_modules) == 1,
            "trainer.fsdp.shard_modules: an import path to a policy function must be its only "
            f"entry (got {list(self.shard_modules)})",
        )


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
    # Data-loading worker processes per rank (a torch DataLoader); 0 loads in the training
    # process. The batches, their order and their random augmentations are the same for any
    # value, so it may change between resumes (orchestrator/loader.py).
    num_workers: int = 0
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
    # FSDP2 settings (used when parallel is fsdp).
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    # Seconds a rank waits in a collective for its peers (a hung or stopped rank) before it
    # fails naming the wait, so the job exits instead of holding its allocation.
    collective_timeout_s: float = 600.0
    # `torch.compile` the model before it is wrapped for data parallelism (each FSDP unit, or
    # the whole model under DDP); the first steps pay the compilation.
    compile: bool = False
    # Recompute each FSDP unit's activations in backward instead of keeping them (the same
    # units as trainer.fsdp.shard_modules chooses, under DDP too): less memory, ~1/3 more compute.
    activation_checkpointing: bool = False
    # Moving averages of the weights, one per decay (e.g. [0.999]), updated after every optimizer
    # step and saved as `ema_<digits>` (ema_999): export/soup it with --prefix ema_999.
    ema: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_decays(self.ema)
        require(self.max_steps >= 0, f"trainer.max_steps must be >= 0 (got {self.max_steps})")
        require(self.nproc >= 1, f"trainer.nproc must be >= 1 (got {self.nproc})")
        require(self.batch_size >= 1, f"trainer.batch_size must be >= 1 (got {self.batch_size})")
        require(
            self.grad_accum_steps >= 1,
            f"trainer.grad_accum_steps must be >= 1 (got {self.grad_accum_steps})",
        )
        _positive_or_none(self.grad_clip, "trainer.grad_clip")
        require(self.num_workers >= 0, f"trainer.num_workers must be >= 0 (got {self.num_workers})")
        require(self.log_every >= 1, f"trainer.log_every must be >= 1 (got {self.log_every})")
        _positive_or_none(self.eval_every, "trainer.eval_every", "null to evaluate only at the end")
        t = self.collective_timeout_s
        require(t > 0, f"trainer.collective_timeout_s must be > 0 seconds (got {t})")


@dataclass(frozen=True)
class OptimConfig:
    # `adamw` or `sgd` (used when _target_ is null).
    name: Literal["adamw", "sgd"] = "adamw"
    # Any optimizer class instead: a name in torch.optim (`RAdam`, `torch.optim.RAdam`) or an
    # import path (`mypkg.opt:Lion`), given the parameters, lr, weight_decay and kwargs.
    target: str | None = None
    # Further keyword arguments of the optimizer class (e.g. {nesterov: true}), not lr or
    # weight_decay; for `name`, not betas or momentum either.
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Peak learning rate (reached after the scheduler's warmup).
    lr: float = 1e-3
    # Decoupled (adamw) or L2 (sgd) weight decay.
    weight_decay: float = 0.0
    # false: parameters of fewer than 2 dimensions (norms' gains, biases) get no weight decay.
    decay_norms_and_biases: bool = True
    # Adam's (beta1, beta2), for `name: adamw` (a `_target_` takes its own in kwargs).
    betas: tuple[float, float] = (0.9, 0.999)
    # SGD momentum, for `name: sgd`.
    momentum: float = 0.0

    def __post_init__(self) -> None:
        require(self.lr > 0, f"optim.lr must be > 0 (got {self.lr})")
        require(
            self.weight_decay >= 0, f"optim.weight_decay must be >= 0 (got {self.weight_decay})"
        )
        require(
            all(0 <= b < 1 for b in self.betas),
            f"optim.betas must both be in [0, 1) (got {list(self.betas)})",
        )
        require(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1) (got {self.momentum})")
        _check_target(self.target, "optim._target_")
        own = {"lr", "weight_decay", "params"} | (
            {"betas", "momentum"} if not self.target else set()
        )
        clash = ", ".join(sorted(own & set(self.kwargs)))
        require(not clash, f"optim.kwargs must not set {clash}: use optim.{clash.split(',')[0]}")


@dataclass(frozen=True)
class SchedulerConfig:
    # `cosine` (linear warmup then cosine decay to min_lr_ratio x lr), `constant` (after
    # warmup), or `wsd` (warmup-stable-decay: constant, then a cooldown to min_lr_ratio x lr
    # over the last cooldown_steps before decay_steps; the usual pretraining schedule).
    name: Literal["cosine", "constant", "wsd"] = "cosine"
    # Any schedule instead, called as `_target_(optimizer=..., **kwargs)`: a class in
    # torch.optim.lr_scheduler (`StepLR`), or an import path to a class or factory function.
    # It is stepped once per optimizer step; warmup_steps, min_lr_ratio and decay_steps do not apply.
    target: str | None = None
    # Keyword arguments of the `_target_` schedule (e.g. {step_size: 10, gamma: 0.5}).
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Steps of linear warmup from 0 to optim.lr.
    warmup_steps: int = 0
    # Floor of the cosine decay, as a fraction of optim.lr.
    min_lr_ratio: float = 0.0
    # Steps over which the cosine decays; null: trainer.max_steps as of the run's first start
    # (kept on resume, so raising max_steps later does not bend the schedule already followed).
    decay_steps: int | None = None
    # `wsd`: steps of the cooldown at the end of the schedule; null: cooldown_fraction of it.
    cooldown_steps: int | None = None
    # `wsd`: the cooldown's share of the schedule when cooldown_steps is null.
    cooldown_fraction: float = 0.2
    # `wsd`: the cooldown's shape: `linear`, `cosine` or `minus-sqrt` (1 - sqrt(progress)).
    cooldown_shape: Literal["linear", "cosine", "minus-sqrt"] = "linear"

    def __post_init__(self) -> None:
        require(
            self.warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0 (got {self.warmup_steps})"
        )
        require(
            0 <= self.min_lr_ratio <= 1,
            f"scheduler.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})",
        )
        _positive_or_none(self.decay_steps, "scheduler.decay_steps", "null for trainer.max_steps")
        _positive_or_none(self.cooldown_steps, "scheduler.cooldown_steps", "null for a fraction")
        require(
            0 < self.cooldown_fraction <= 1,
            f"scheduler.cooldown_fraction must be in (0, 1] (got {self.cooldown_fraction})",
        )
        _check_target(self.target, "scheduler._target_")
        require(
            self.target is not None or not self.kwargs,
            "scheduler.kwargs are for a scheduler._target_; the built-in schedules take none",
        )
        own = (self.warmup_steps, self.min_lr_ratio, self.decay_steps) != (0, 0.0, None)
        require(
            self.target is None or not own,
            "scheduler.warmup_steps, min_lr_ratio and decay_steps are for the built-in schedules; "
            "give scheduler._target_ its own settings in scheduler.kwargs",
        )


def _check_target(target: str | None, key: str) -> None:
    require(
        target is None or (bool(target.strip()) and " " not in target),
        f"{key} must be a class name or an import path like 'package.module:Class' "
        f"(got {target!r}); null uses the built-in one",
    )


# One type for `storage:` and the storage backends, so the rules are checked once, on load;
# everything carries the section whole and only the backend of a URL reads its own field.
StorageConfig = StorageOptions
S3Config = S3Options


@dataclass(frozen=True)
class LoggingConfig:
    # Rank 0 writes TensorBoard event files under <run.dir>/tb/ (loss, lr, eval, step time,
    # checkpoint timings, restarts and commits); a resumed run hides the steps it re-trains.
    # Skipped with a warning when the tensorboard package is not installed.
    tensorboard: bool = True
    # Also log to Weights & Biases (needs `pip install wandb`); the run id is kept in
    # <run.dir>/wandb_id so every restart continues the same W&B run.
    wandb: bool = False
    # W&B project; null: the run's name.
    wandb_project: str | None = None


@dataclass(frozen=True)
class ResumeConfig:
    # Resume even if the config changed in a way that changes the computation (e.g. optim.lr).
    allow_config_change: bool = False


@dataclass(frozen=True)
class Config:
    # Your own training script instead of the built-in loop: `package.module:function`, called
    # on every rank with this Config (`function(cfg)`); it trains through
    # `orchestrator.training(cfg)`. Its own settings go in the `task:` block. null: the
    # built-in loop trains `task`.
    entrypoint: str | None = None
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
    # What rank 0 logs besides metrics.jsonl (may change freely between resumes).
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    # A sweep: dotted config keys -> lists of values, e.g. {optim.lr: [1e-3, 3e-3], run.seed:
    # [0, 1]}. `stockpot submit` runs their cartesian product as ONE Slurm array, each element
    # in its own <run.dir>/<index>-<key>=<value>,... (`expand_sweep`); empty: a single run.
    # Elements carry no sweep, so it never enters their resume drift check.
    sweep: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.entrypoint is not None:
            module, _, function = self.entrypoint.partition(":")
            require(
                bool(module.strip()) and function.isidentifier(),
                "entrypoint must be 'package.module:function' "
                f"(got {self.entrypoint!r}); null runs the built-in loop",
            )
        # The defaults' own keys are what a sweep may name; computed only for a sweep, since
        # building the defaults runs this method again (with an empty sweep).
        keys = _schema_keys() if self.sweep else frozenset()
        object.__setattr__(self, "sweep", check_sweep(self.sweep, keys))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data; `from_dict(to_dict())` gives back an equal config."""
        return _to_plain(self)


@functools.cache
def _schema_keys() -> frozenset[str]:
    return frozenset(flatten(Config().to_dict()))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, TaskConfig):
        return {"_target_": obj.target, **_to_plain(dict(obj.params))}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_yaml_key(f.name): _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _yaml_key(name: str) -> str:
    """A section's `target` field is its `_target_` key (Hydra's spelling, as in `task:`)."""
    return "_target_" if name == "target" else name


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{a: {b: 1}} -> {"a.b": 1}; an empty mapping stays one key (so `sweep: {}` is listed)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out
