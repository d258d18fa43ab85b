"""One rank's training session: what every run needs, whoever writes its loop.

`Session` joins the process group, checks run.dir, catches the stop signals, and owns the run's
checkpointer, metrics log and progress; the loop (the built-in one in `loop.py`, or a user's own
through `api.training`) registers what it trains and calls `restore()` once everything is
registered. The same code runs under Slurm (srun/submitit), torchrun and `stockpot run`.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator import dist, ema, ending, parallel
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.stateful import Stateful
from orchestrator.config import Config, computation_view, config_hash, diff_views, to_yaml
from orchestrator.env import EXIT_STOPPED, DistEnv, backend_for, cpu_threads, device_for
from orchestrator.errors import ConfigError
from orchestrator.logs import LEADER_ONLY
from orchestrator.metrics import MetricsLog, StartupClock
from orchestrator.preemption import StopFlag
from orchestrator.progress import Progress
from orchestrator.state import ModelAndOptimizer, RNGState
from orchestrator.storage import Store
from orchestrator.storage.check import StorageSetupError

log = logging.getLogger(__name__)

# Wrapped models and process groups are never destroyed in this process: destroying a DDP
# Reducer holds the GIL while gloo's worker thread waits for it to free a tensor (a deadlock
# seen here), and other C++ teardown aborts now and then. The process leaves with os._exit
# once everything is committed (worker.exit_now), so they are kept referenced until then.
_RETAINED: list[object] = []

# Names the session registers itself (after the loop's own).
RESERVED = ("progress", "rng")


@dataclass(frozen=True)
class Outcome:
    finished: bool  # reached trainer.max_steps (else stopped by a signal, after saving)
    step: int
    signal: str = ""
    save_s: float | None = None  # how long the stop's save took, signal to commit

    @property
    def exit_code(self) -> int:
        """0 when finished; EXIT_STOPPED (75: resumable) when stopped by a signal."""
        return 0 if self.finished else EXIT_STOPPED


def run_dir_store(cfg: Config) -> Store:
    """run.dir as a Store: the run's checkpoints, metrics and config."""
    return Store(cfg.run.dir, cfg.storage)


def check_storage(cfg: Config) -> None:
    """The leader probes run.dir before any training; every rank leaves alike (exit 2) on a
    bad set-up, and only the leader says why (StorageSetupError is logged leader-only)."""
    problem = dist.leader_decides(lambda: run_dir_store(cfg).check_writable()).problem
    if problem is not None:
        raise StorageSetupError(problem)


class Session:
    """Open it (`with Session(cfg, env) as s:`), build and `register` the run's state, then
    `restore()`; the loop drives `ckpt`, `metrics`, `stop` and `progress`."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.startup = StartupClock()  # the `startup` line, after the first step
        self.startup.mark("imports")
        self.cfg, self.env = cfg, env
        self.device = device_for(env.local_rank, cfg.trainer.device, torch.cuda.is_available())
        self.store = run_dir_store(cfg)
        self.stop = StopFlag()
        self.progress = Progress()
        ending.watch(self.progress)  # a failure is placed at its step
        self.metrics = MetricsLog(self.store, enabled=env.is_leader, restart=env.restart_count)
        self._ckpt: Checkpointer | None = None
        self.restored_step: int | None = None  # None until restore(); 0 on a fresh start

    def __enter__(self) -> Session:
        env, cfg = self.env, self.cfg
        threads = cpu_threads(os.environ, len(os.sched_getaffinity(0)), env.local_world_size)
        if threads is not None:
            torch.set_num_threads(threads)
        log.info("%d rank(s) on %s, %d CPU thread(s) per rank%s", env.world_size, self.device,
                 torch.get_num_threads(), "" if threads else " (OMP_NUM_THREADS)",
                 extra=LEADER_ONLY)  # fmt: skip
        if env.is_distributed and not dist.is_initialized():  # a user's script may have
            dist.init(
                backend_for(self.device),
                *(env.rank, env.world_size, env.master_addr, env.master_port),
                timeout_s=cfg.trainer.collective_timeout_s,
            )
        check_storage(cfg)
        self.startup.mark("rendezvous")
        self.stop.install()
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.uninstall()

    @property
    def ckpt(self) -> Checkpointer:
        """Built on first use: a loop may register before anything else touches it."""
        if self._ckpt is None:
            self._ckpt = Checkpointer(
                self.store,
                config=self.cfg.checkpoint,
                # Metrics first: once a checkpoint commits, a resume never re-runs its steps,
                # so their lines must already be durable (a kill in between would lose them);
                # with tiers, not at the cost of the save (`_flush_metrics`).
                before_save=self._flush_metrics,
                on_commit=self.metrics.commit,
                parallel=self.cfg.trainer.parallel,
                config_hash=config_hash(self.cfg),
                after_first_step=self._first_step_done,
                on_durable=self.metrics.durable,
            )
        return self._ckpt

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this rank's device, wrapped as trainer.parallel says (DDP or FSDP2,
        the same unit policy as the built-in loop); kept alive until the process leaves."""
        trainer = self.cfg.trainer
        wrapped = parallel.wrap(
            model,
            trainer.parallel,
            device=self.device,
            mixed_precision=trainer.mixed_precision,
            shard_modules=trainer.fsdp.shard_modules,
            compile=trainer.compile,
            activation_checkpointing=trainer.activation_checkpointing,
        )
        _RETAINED.append(wrapped)
        return wrapped

    def register(self, name: str, obj: Stateful, *, per_rank: bool = False) -> None:
        if self.restored_step is not None:
            raise RuntimeError(f"register({name!r}) after restore(): register everything first")
        self.ckpt.register(name, obj, per_rank=per_rank)

    def register_model(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """The model and optimizer as `train` (the names export and soups read), and one EMA
        of the model per trainer.ema decay, each under its own name (`ema_999`, ema.py)."""
        self.register("train", ModelAndOptimizer(model, optimizer))
        for average in ema.averages(model, optimizer, self.cfg.trainer.ema):
            self.register(average.name, average)

    def restore(self) -> int:
        """Register progress and RNG, then load the newest committed checkpoint (if any) into
        everything registered; refuse a config that changed the computation. Returns the step
        to continue from (0 on a fresh run). Then writes config.yaml and opens the metrics."""
        if self.restored_step is not None:
            raise RuntimeError("restore() was already called")
        cfg, env = self.cfg, self.env
        self.startup.mark("build")
        _RETAINED.append(self)
        self.ckpt.register("progress", self.progress)
        self.ckpt.register("rng", RNGState(), per_rank=True)
        _seed_rank(cfg.run.seed, env.rank)  # restore overwrites these with the saved streams
        self._resume_or_start()
        self.startup.mark("restore")
        if env.is_leader:
            self.store.write_bytes("config.yaml", to_yaml(cfg).encode())
        self.metrics.start(
            self.progress.step,
            self.progress.resumes,
            tensorboard=cfg.logging.tensorboard,
            wandb_project=(cfg.logging.wandb_project or cfg.run.name)
            if cfg.logging.wandb
            else None,
            name=cfg.run.name,
        )
        self.startup.mark("logs")
        self.restored_step = self.progress.step
        return self.progress.step

    def _flush_metrics(self) -> None:
        """Before each save. A tiered save commits on the nodes: the metrics lines go to run.dir
        on a thread of their own (held in memory while it does not answer, an S3 outage)."""
        if self.cfg.checkpoint.local_dir is None:
            self.metrics.flush()
        else:
            self.metrics.flush_soon()

    def _first_step_done(self, step: int) -> None:
        """The checkpointer was offered this life's first step: the start-up is over."""
        self.startup.mark("first_step")
        ending.mark_started(os.environ, self.env.rank)
        self.metrics.started(step, self.startup)
        self.metrics.open_deferred()  # TensorBoard's writer, after the first step

    def _resume_or_start(self) -> None:
        cfg, progress = self.cfg, self.progress
        info = self.ckpt.restore()
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
        if info.manifest.world_size != self.env.world_size:
            log.warning(
                "resuming world size %d from a checkpoint of world size %d: model and "
                "optimizer are exact; data continues at the same global sample",
                self.env.world_size,
                info.manifest.world_size,
                extra=LEADER_ONLY,
            )
        progress.resumes += 1
        log.info(
            "resumed from step %d (resume #%d)", info.step, progress.resumes, extra=LEADER_ONLY
        )


def _seed_rank(seed: int, rank: int) -> None:
    mixed = seed * 1_000_003 + rank
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


# The share of the signal's grace window a stop may spend making its checkpoint durable: the
# rest is for the exit (and Slurm's clock is not ours).
FLUSH_SHARE = 0.8


def commit_stop(
    step: int,
    latest: Mapping[str, float],
    ckpt: Checkpointer,
    metrics: MetricsLog,
    stop: StopFlag,
    grace_s: float,
) -> Outcome:
    """Every rank agreed to stop after `step` (either loop): save it (after any save in flight),
    commit, record the stop, flush the metrics (the commit's own line and TensorBoard's events
    before the process leaves), and say how long signal to commit took. With tiered
    checkpoints the step is then made durable within the signal's grace window (`grace_s`,
    launcher.signal_delay_s, less a margin for the exit), or the log says it is not."""
    t0 = time.monotonic()
    ckpt.save_final(step, latest)
    flushed = ckpt.flush_durable((stop.received_at or t0) + grace_s * FLUSH_SHARE)
    if flushed is not None:
        durable, newest = flushed
        if not durable:
            log.warning(
                "step %d is committed on the local tier only (newest durable step: %s): a "
                "requeue onto the same nodes resumes from it, elsewhere from the durable one",
                step,
                newest,
                extra=LEADER_ONLY,
            )
    metrics.stopped(step, stop.signal_name)
    metrics.flush(hold_on_failure=flushed is not None)  # tiered: the exit goes on regardless
    if metrics.held:
        log.warning("metrics: %d line(s) of this life are lost: run.dir did not answer",
                    metrics.held, extra=LEADER_ONLY)  # fmt: skip
    since_signal = time.monotonic() - (stop.received_at or t0)
    log.warning(
        "stop requested (%s): step %d committed %.2f s after the signal; run again to resume",
        stop.signal_name or "another rank",
        step,
        since_signal,
        extra=LEADER_ONLY,
    )
    return Outcome(False, step, stop.signal_name, since_signal)
