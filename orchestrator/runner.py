"""One rank's training run: join the group, build the parts, resume, train, leave.

The same code runs under Slurm (srun/submitit), under torchrun, and under `stockpot run`'s own
local spawner; the environment decides rank, world size and rendezvous (`env.DistEnv`).
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from orchestrator import dist, parallel
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.config import Config, computation_view, config_hash, diff_views, to_yaml
from orchestrator.data import ResumableSampler
from orchestrator.env import EXIT_STOPPED, DistEnv, backend_for, cpu_threads, device_for
from orchestrator.errors import ConfigError, StorageError
from orchestrator.logs import LEADER_ONLY
from orchestrator.loop import Outcome, TrainingRun, train
from orchestrator.metrics import MetricsLog
from orchestrator.optim import TargetError, build_optimizer, build_scheduler, check_targets
from orchestrator.preemption import StopFlag
from orchestrator.progress import Progress
from orchestrator.state import ModelAndOptimizer, RNGState
from orchestrator.storage import Store
from orchestrator.storage.check import StorageSetupError
from orchestrator.tasks import build_task

log = logging.getLogger(__name__)

# Wrapped models and process groups are never destroyed in this process: destroying a DDP
# Reducer holds the GIL while gloo's worker thread waits for it to free a tensor (a deadlock
# seen here), and other C++ teardown aborts now and then. The process leaves with os._exit
# once everything is committed (worker.exit_now), so they are kept referenced until then.
_RETAINED: list[object] = []


def train_rank(cfg: Config, env: DistEnv) -> Outcome:
    """Train this rank. The process group is left up (see _RETAINED): leave with exit_now."""
    device = device_for(env.local_rank, cfg.trainer.device, torch.cuda.is_available())
    threads = cpu_threads(os.environ, len(os.sched_getaffinity(0)), env.local_world_size)
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("%d rank(s) on %s, %d CPU thread(s) per rank%s", env.world_size, device,
             torch.get_num_threads(), "" if threads else " (OMP_NUM_THREADS)",
             extra=LEADER_ONLY)  # fmt: skip
    if env.is_distributed:
        dist.init(
            backend_for(device),
            *(env.rank, env.world_size, env.master_addr, env.master_port),
            timeout_s=cfg.trainer.collective_timeout_s,
        )
    check_storage(cfg)
    with StopFlag() as stop:
        training = build(cfg, env, device, stop)
        _RETAINED.append(training)
        return train(training, cfg.trainer)


def exit_code(outcome: Outcome) -> int:
    return 0 if outcome.finished else EXIT_STOPPED


def check_storage(cfg: Config) -> None:
    """The leader probes run.dir before any training; every rank leaves alike (exit 2) on a
    bad set-up, and only the leader says why (StorageSetupError is logged leader-only)."""
    problem = dist.leader_decides(lambda: run_dir_store(cfg).check_writable()).problem
    if problem is not None:
        raise StorageSetupError(problem)


def check_optim(cfg: Config) -> None:
    """The leader builds the configured optimizer and schedule on a probe parameter; a bad
    `_target_` or kwargs stops every rank alike (exit 2) before training, said once."""
    problem = dist.leader_decides(lambda: check_targets(cfg.optim, cfg.scheduler)).problem
    if problem is not None:
        raise TargetError(problem)


def run_dir_store(cfg: Config) -> Store:
    """run.dir as a Store: the run's checkpoints, metrics and config."""
    return Store(cfg.run.dir, cfg.storage)


def build(cfg: Config, env: DistEnv, device: str, stop: StopFlag) -> TrainingRun:
    store = run_dir_store(cfg)
    task = build_task(cfg.task.target, dict(cfg.task.params))
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = task.build_model()
    if cfg.model.init_from and _fresh(store):
        init_from(model, cfg.model.init_from, store)
    model = parallel.wrap(
        model,
        cfg.trainer.parallel,
        device=device,
        mixed_precision=cfg.trainer.mixed_precision,
        shard_modules=cfg.trainer.fsdp.shard_modules,
        compile=cfg.trainer.compile,
        activation_checkpointing=cfg.trainer.activation_checkpointing,
    )
    _RETAINED.append(model)
    check_optim(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    progress = Progress()
    scheduler = build_scheduler(optimizer, cfg.scheduler, lambda: progress.horizon)
    train_data, eval_data = task.train_set(), task.eval_set()
    sampler = ResumableSampler(
        len(train_data), cfg.trainer.batch_size, env.rank, env.world_size, cfg.run.seed
    )
    metrics = MetricsLog(store, enabled=env.is_leader, restart=env.restart_count)
    ckpt = Checkpointer(
        store,
        config=cfg.checkpoint,
        # Metrics first: once a checkpoint commits, a resume never re-runs its steps, so their
        # lines must already be durable (a kill in between would lose them).
        before_save=metrics.flush,
        on_commit=metrics.commit,
        parallel=cfg.trainer.parallel,
        config_hash=config_hash(cfg),
    )
    ckpt.register("train", ModelAndOptimizer(model, optimizer))
    ckpt.register("scheduler", scheduler)
    ckpt.register("sampler", sampler)
    ckpt.register("progress", progress)
    ckpt.register("rng", RNGState(), per_rank=True)
    _seed_rank(cfg.run.seed, env.rank)  # restore overwrites these with the saved streams
    _resume_or_start(cfg, ckpt, progress, sampler, env)
    if env.is_leader:
        store.write_bytes("config.yaml", to_yaml(cfg).encode())
    metrics.start(
        progress.step,
        progress.resumes,
        tensorboard=cfg.logging.tensorboard,
        wandb_project=(cfg.logging.wandb_project or cfg.run.name) if cfg.logging.wandb else None,
        name=cfg.run.name,
    )
    return TrainingRun(
        env=env,
        device=device,
        task=task,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_data=train_data,
        eval_data=eval_data,
        sampler=sampler,
        progress=progress,
        ckpt=ckpt,
        metrics=metrics,
        stop=stop,
    )


def _fresh(store: Store) -> bool:
    """True if the run has no committed checkpoint yet. The leader scans and tells the others:
    one listing of the run dir, not one per rank (on S3 each is a request)."""
    decision = dist.leader_decides(lambda: not catalog.scan(store).committed)
    return decision.or_raise(StorageError, f"{store.path()}: ")


def _seed_rank(seed: int, rank: int) -> None:
    mixed = seed * 1_000_003 + rank
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


def _resume_or_start(
    cfg: Config, ckpt: Checkpointer, progress: Progress, sampler: ResumableSampler, env: DistEnv
) -> None:
    info = ckpt.restore()
    view = computation_view(cfg)
    if info is None:
        progress.horizon = cfg.scheduler.decay_steps or cfg.trainer.max_steps
        progress.config = view
        return
    changes = diff_views(progress.config, view)
    if changes and not cfg.resume.allow_config_change:
        raise ConfigError(
            f"config changed since checkpoint step {info.step}: {'; '.join(changes)}; "
            "set resume.allow_config_change=true to resume anyway, or use a new run.dir"
        )
    if changes:
        log.warning("resuming with a changed config (allowed): %s", "; ".join(changes))
        progress.config = view
    if info.manifest.world_size != env.world_size:
        log.warning(
            "resuming world size %d from a checkpoint of world size %d: model and "
            "optimizer are exact; data continues at global sample %d",
            env.world_size,
            info.manifest.world_size,
            sampler.samples_seen,
            extra=LEADER_ONLY,
        )
    progress.resumes += 1
    log.info("resumed from step %d (resume #%d)", info.step, progress.resumes, extra=LEADER_ONLY)


def init_from(model: torch.nn.Module, source: str, store: Store) -> None:
    """Load matching parameters from `source` into a fresh model; refuse shape mismatches."""
    from orchestrator.checkpoint.weights import read_weights
    from orchestrator.ties import tied_parameters, truly_missing

    weights, where = read_weights(source, store.options)
    own = model.state_dict()
    for name, tensor in weights.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"model.init_from {source}: parameter {name!r} has shape {tuple(tensor.shape)} "
                f"there but {tuple(own[name].shape)} in this model"
            )
    result = model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    result.missing_keys[:] = truly_missing(result.missing_keys, tied_parameters(model))  # ties
    unexpected = sorted(set(weights) - set(own))
    loaded = len(own) - len(result.missing_keys)
    log.info("initialised from %s: %d tensors loaded", where, loaded, extra=LEADER_ONLY)
    if result.missing_keys:
        log.warning(
            "init_from: not in the source (left as initialised): %s",
            ", ".join(result.missing_keys),
            extra=LEADER_ONLY,
        )
    if unexpected:
        log.warning(
            "init_from: in the source but not in this model (ignored): %s",
            ", ".join(unexpected),
            extra=LEADER_ONLY,
        )
