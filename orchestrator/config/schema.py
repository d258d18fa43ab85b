"""The config schema: frozen dataclasses, one per section, each validating itself on construction.

A comment on every field says what it does (tests hold that); the values are checked in
`__post_init__` with a one-line error that says how to fix them. Building these from YAML and
overrides is `loading`'s job; what a sweep may vary is `sweeps`'.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.checkpoint.retention import KeepBest
from orchestrator.config.sweeps import check_sweep
from orchestrator.errors import require
from orchestrator.storage.options import S3Options


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

    def __post_init__(self) -> None:
        require(self.max_steps >= 0, f"trainer.max_steps must be >= 0 (got {self.max_steps})")
        require(self.nproc >= 1, f"trainer.nproc must be >= 1 (got {self.nproc})")
        require(self.batch_size >= 1, f"trainer.batch_size must be >= 1 (got {self.batch_size})")
        require(
            self.grad_accum_steps >= 1,
            f"trainer.grad_accum_steps must be >= 1 (got {self.grad_accum_steps})",
        )
        _positive_or_none(self.grad_clip, "trainer.grad_clip")
        require(self.log_every >= 1, f"trainer.log_every must be >= 1 (got {self.log_every})")
        _positive_or_none(self.eval_every, "trainer.eval_every", "null to evaluate only at the end")
        t = self.collective_timeout_s
        require(t > 0, f"trainer.collective_timeout_s must be > 0 seconds (got {t})")


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
        require(self.lr > 0, f"optim.lr must be > 0 (got {self.lr})")
        require(
            self.weight_decay >= 0, f"optim.weight_decay must be >= 0 (got {self.weight_decay})"
        )
        require(
            all(0 <= b < 1 for b in self.betas),
            f"optim.betas must both be in [0, 1) (got {list(self.betas)})",
        )
        require(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1) (got {self.momentum})")


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
        require(
            self.warmup_steps >= 0, f"scheduler.warmup_steps must be >= 0 (got {self.warmup_steps})"
        )
        require(
            0 <= self.min_lr_ratio <= 1,
            f"scheduler.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})",
        )
        _positive_or_none(self.decay_steps, "scheduler.decay_steps", "null for trainer.max_steps")


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
    # Also keep the k best by an eval metric (retention's own type: it checks its fields).
    keep_best: KeepBest = field(default_factory=KeepBest)
    # Also keep every checkpoint whose step is a multiple of N (milestones); null disables.
    keep_every_steps: int | None = None
    # Also keep the WEIGHTS (no optimizer state) of every checkpoint whose step is a multiple of
    # N, e.g. soup ingredients; full checkpoints follow the rules above; null disables.
    keep_weights_every_steps: int | None = None
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
        _positive_or_none(self.keep_weights_every_steps, "checkpoint.keep_weights_every_steps")


# One type for `storage.s3.*` and the S3 backend, so the rules are checked once, on load.
S3Config = S3Options


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
            require(value >= 1, f"launcher.{key} must be >= 1 (got {value})")
        require(
            self.gpus_per_node >= 0,
            f"launcher.gpus_per_node must be >= 0 (got {self.gpus_per_node})",
        )
        _positive_or_none(self.mem_gb, "launcher.mem_gb", "null for the partition default")
        require(
            self.signal_delay_s >= 0,
            f"launcher.signal_delay_s must be >= 0 (got {self.signal_delay_s})",
        )
        require(
            self.max_requeues >= 0, f"launcher.max_requeues must be >= 0 (got {self.max_requeues})"
        )


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
class SoupConfig:
    # After training, merge checkpoints into a model soup in a dependent job.
    enabled: bool = False
    # How to merge: `uniform` mean, `weighted` mean (soup.weights), `greedy` (add an ingredient
    # only if the held-out score does not drop), `learned` (mixing coefficients fit on held-out).
    recipe: Literal["uniform", "weighted", "greedy", "learned"] = "uniform"
    # Name of the soup; it is written to <run.dir>/soups/<name>/ unless soup.out is set.
    name: str = "soup"
    # Where the ingredients come from: run dirs, a sweep dir, committed checkpoints or
    # .safetensors files (local or s3://); empty: this config's run.dir.
    sources: tuple[str, ...] = ()
    # Output directory (local or s3://); null: <run.dir>/soups/<name>/.
    out: str | None = None
    # `weighted` only: one weight per ingredient, in ingredient order; normalised to sum 1.
    weights: tuple[float, ...] = ()
    # Keep checkpoints with step in [A, B] (`A:B`; either side may be empty); null: all.
    steps: str | None = None
    # Keep checkpoints whose step is a multiple of this; null: all.
    every: int | None = None
    # Keep the newest K checkpoints (after the rules above); null: all.
    last: int | None = None
    # Keep the K best by soup.metric (after the rules above); null: all.
    top: int | None = None
    # Metric that ranks checkpoints (`top`, a sweep run's best) and scores soups (`greedy`,
    # `learned`, the report), e.g. eval/accuracy; null: eval/loss.
    metric: str | None = None
    # Whether a larger (`max`) or smaller (`min`) soup.metric is better; null: min for names
    # with loss/error/perplexity in them, else max.
    mode: Literal["max", "min"] | None = None
    # The checkpoint-soup rule: keep a checkpoint if it beats every earlier one on at least one
    # of these metrics (in step order), e.g. [eval/loss, eval/accuracy].
    improved_any: tuple[str, ...] = ()
    # `learned` only: one coefficient per ingredient and tensor instead of per ingredient.
    per_layer: bool = False
    # `learned` only: passes over the held-out set to fit the coefficients.
    learned_epochs: int = 10
    # `learned` only: AdamW's learning rate for the coefficients.
    learned_lr: float = 0.05
    # `learned` holds every ingredient's tensors at once: refuse when that exceeds this many
    # GB; null: no bound.
    max_memory_gb: float | None = None
    # Recompute BatchNorm running statistics on training data after merging (torch update_bn).
    recompute_bn: bool = False
    # Skip the shared-starting-point check (a midpoint far worse than both ingredients).
    allow_unrelated: bool = False
    # Print a score table and write <out>/soup.png (needs the run's task).
    report: bool = False
    # Also write the soup as a committed stockpot checkpoint under this run dir (model only).
    out_checkpoint: str | None = None
    # Check each ingredient before reading it: `checksums` (every file, as `stockpot verify`)
    # or `sizes` (cheap, catches truncation only).
    verify: Literal["checksums", "sizes"] = "checksums"
    # Largest output .safetensors file in MB; a larger soup is sharded with an index, as
    # Hugging Face does.
    shard_mb: float = 5000.0
    # Parallel range reads (S3 especially); memory grows with read-ahead, not with this.
    read_workers: int = 4
    # Samples per batch when scoring on held-out data.
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        require(
            bool(self.name) and "/" not in self.name,
            f"soup.name must be a plain name (got {self.name!r})",
        )
        require(
            all(w >= 0 for w in self.weights) and (not self.weights or sum(self.weights) > 0),
            f"soup.weights must be >= 0 and not all 0 (got {list(self.weights)})",
        )
        require(
            not self.weights or self.recipe == "weighted",
            f"soup.weights is for recipe weighted (recipe is {self.recipe})",
        )
        for key in ("every", "last", "top"):
            value = getattr(self, key)
            require(
                value is None or value >= 1, f"soup.{key} must be >= 1 (got {value}); null: off"
            )
        require(self.shard_mb > 0, f"soup.shard_mb must be > 0 (got {self.shard_mb})")
        for key in ("learned_epochs", "read_workers", "eval_batch_size"):
            value = getattr(self, key)
            require(value >= 1, f"soup.{key} must be >= 1 (got {value})")
        require(self.learned_lr > 0, f"soup.learned_lr must be > 0 (got {self.learned_lr})")
        _positive_or_none(self.max_memory_gb, "soup.max_memory_gb")
        require(
            self.steps is None or self.steps.count(":") == 1,
            f"soup.steps must be A:B, e.g. 100:500 or 200: (got {self.steps!r})",
        )


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
    # What rank 0 logs besides metrics.jsonl (may change freely between resumes).
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    # A sweep: dotted config keys -> lists of values, e.g. {optim.lr: [1e-3, 3e-3], run.seed:
    # [0, 1]}. `stockpot submit` runs their cartesian product as ONE Slurm array, each element
    # in its own <run.dir>/<index>-<key>=<value>,... (`expand_sweep`); empty: a single run.
    # Elements carry no sweep, so it never enters their resume drift check.
    sweep: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


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
