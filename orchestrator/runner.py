"""The built-in loop's run on one rank: build the task's parts inside a `Session`, resume,
train (`loop.train`), leave.

The same code runs under Slurm (srun/submitit), under torchrun, and under `stockpot run`'s own
local spawner; the environment decides rank, world size and rendezvous (`env.DistEnv`).
"""

from __future__ import annotations

import logging

import torch

from orchestrator import dist
from orchestrator.checkpoint import catalog
from orchestrator.config import Config
from orchestrator.env import DistEnv
from orchestrator.errors import ConfigError, StorageError
from orchestrator.loader import ResumableLoader
from orchestrator.logs import LEADER_ONLY
from orchestrator.loop import Outcome, TrainingRun, train
from orchestrator.optim import TargetError, build_optimizer, build_scheduler, check_targets
from orchestrator.session import Session, run_dir_store
from orchestrator.storage import Store
from orchestrator.tasks import build_task

log = logging.getLogger(__name__)

__all__ = ["build", "init_from", "run_dir_store", "train_rank"]


def train_rank(cfg: Config, env: DistEnv) -> Outcome:
    """Train this rank. The process group is left up (session._RETAINED): leave with exit_now."""
    with Session(cfg, env) as session:
        run = build(cfg, session)
        try:
            return train(run, cfg.trainer)
        finally:
            run.train_loader.close()  # its workers, before the rank's os._exit


def check_optim(cfg: Config) -> None:
    """The leader builds the configured optimizer and schedule on a probe parameter; a bad
    `_target_` or kwargs stops every rank alike (exit 2) before training, said once."""
    problem = dist.leader_decides(lambda: check_targets(cfg.optim, cfg.scheduler)).problem
    if problem is not None:
        raise TargetError(problem)


def build(cfg: Config, session: Session) -> TrainingRun:
    env, store = session.env, session.store
    task = build_task(cfg.task.target, dict(cfg.task.params))
    model = task.build_model()  # the session seeded torch alike on every rank
    if cfg.model.init_from and _fresh(store):
        init_from(model, cfg.model.init_from, store)
    model = session.wrap(model)
    check_optim(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    progress = session.progress
    scheduler = build_scheduler(optimizer, cfg.scheduler, lambda: progress.horizon)
    train_data, eval_data = task.train_set(), task.eval_set()
    loader = ResumableLoader(
        train_data,
        cfg.trainer.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.run.seed,
        num_workers=cfg.trainer.num_workers,
    )
    session.register_model(model, optimizer)  # `train`, and trainer.ema's averages
    session.register("scheduler", scheduler)
    session.register("sampler", loader)  # the key of the bare sampler it replaced
    session.restore()
    return TrainingRun(
        env=env,
        device=session.device,
        task=task,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=loader,
        eval_data=eval_data,
        progress=progress,
        ckpt=session.ckpt,
        metrics=session.metrics,
        stop=session.stop,
        grace_s=session.cfg.launcher.signal_delay_s,
    )


def _fresh(store: Store) -> bool:
    """True if the run has no committed checkpoint yet. The leader scans and tells the others:
    one listing of the run dir, not one per rank (on S3 each is a request)."""
    decision = dist.leader_decides(lambda: not catalog.scan(store).committed)
    return decision.or_raise(StorageError, f"{store.path()}: ")


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
