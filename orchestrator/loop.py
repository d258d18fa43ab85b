"""The training loop. Short on purpose: what to do at each step is decided by the components
(loader, checkpointer, stop flag, metrics log); the loop only calls them in order.

Every rank runs the same sequence of collectives: the stop check (posted before a step,
answered after it: every step when steps are slow, every few when they are fast, see
`cadence.StopChecks`), metric reductions at log/eval steps, and the checkpointer's own collectives.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator import dist, parallel
from orchestrator.cadence import StopChecks
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.config import TrainerConfig
from orchestrator.env import DistEnv
from orchestrator.loader import ResumableLoader
from orchestrator.logs import LEADER_ONLY
from orchestrator.metrics import MetricsLog
from orchestrator.preemption import StopFlag
from orchestrator.progress import Progress
from orchestrator.session import Outcome, commit_stop
from orchestrator.tasks.base import eval_batches

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """What one rank trains with, built by `runner.build`: its place in the job, the task's
    model and data, and the components the loop calls."""

    env: DistEnv
    device: str
    task: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: ResumableLoader  # the training batches and their position (epoch, sample)
    eval_data: Any
    progress: Progress
    ckpt: Checkpointer  # decides when to save (its schedule); the loop offers every step
    metrics: MetricsLog
    stop: StopFlag
    grace_s: float = 120.0  # launcher.signal_delay_s: a stop's time to make its save durable


def train(run: TrainingRun, trainer: TrainerConfig) -> Outcome:
    latest: dict[str, float] = {}  # newest mean loss and eval metrics: what manifests record
    run.model.train()  # once: evaluate() puts it back after its own eval()
    _freeze_what_is_built()
    window = _Window(run.progress.step)
    checks = StopChecks(run.progress.step)
    while run.progress.step < trainer.max_steps:
        # Posted before the step, answered after it: a stop seen by any rank when a checked
        # step began ends the run after it, on every rank, without a stall at each boundary.
        checks.post(run.progress.step, run.stop.requested)
        loss, epoch_ended = _train_step(run, trainer)
        run.progress.step += 1
        step = run.progress.step
        if step % trainer.log_every == 0:
            latest["loss"] = _log_progress(run, trainer, step, loss, window)
        if trainer.eval_every and step % trainer.eval_every == 0:
            latest.update(evaluate(run, trainer.batch_size))
        run.ckpt.maybe_save(step, latest, epoch_ended=epoch_ended, epoch=run.train_loader.epoch)
        if checks.answer(step) and step < trainer.max_steps:  # at max_steps: finish normally
            return _stop(run, latest)
    return _finish(run, trainer, latest)


def _train_step(run: TrainingRun, trainer: TrainerConfig) -> tuple[torch.Tensor, bool]:
    total = torch.zeros((), device=run.device)
    epoch_ended = False
    for _ in range(trainer.grad_accum_steps):
        batch = _to(next(run.train_loader), run.device)
        epoch_ended |= run.train_loader.epoch_just_ended
        with parallel.autocast(run.device, trainer.parallel, trainer.mixed_precision):
            loss = run.task.loss(run.model, batch) / trainer.grad_accum_steps
        loss.backward()
        total += loss.detach().float()
    if trainer.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), trainer.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total, epoch_ended


def _freeze_what_is_built() -> None:
    """Move every object alive now (modules imported, the model, the data) out of the cyclic
    garbage collector's reach (`gc.freeze`): it no longer walks them each time the steps'
    short-lived objects trigger a full collection. Freed objects are still freed (reference
    counting); only cycles among them would wait. A rank holds many more objects than a
    hand-written loop (TensorBoard, protobuf, our modules), so those walks were most of the
    gap to it on short steps (figures: bench/README.md, "Loop overhead")."""
    gc.collect()
    gc.freeze()


def _to(batch: tuple[torch.Tensor, ...], device: str) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(device, non_blocking=True) for x in batch)


class _Window:
    """Steps per second since the last progress line."""

    def __init__(self, step: int) -> None:
        self.step, self.time = step, time.monotonic()

    def rate(self, step: int) -> float:
        now = time.monotonic()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return rate


def _log_progress(
    run: TrainingRun, trainer: TrainerConfig, step: int, loss: torch.Tensor, window: _Window
) -> float:
    """Record (and, on the leader, print) this step's loss averaged over ranks; returns it."""
    (loss_sum,) = dist.all_reduce_sum([float(loss)])
    mean = loss_sum / dist.world_size()
    lr = float(run.scheduler.get_last_lr()[0])
    rate = window.rate(step)
    step_s = 1 / rate if rate > 0 else math.inf  # seconds per step: a TensorBoard curve
    run.metrics.record(step, {"loss": mean, "lr": lr, "time/step_s": step_s})
    eta = (trainer.max_steps - step) / rate if rate > 0 else math.inf
    log.info(
        "step %d/%d loss %.4f lr %.3g %.1f step/s ETA %s",
        step,
        trainer.max_steps,
        mean,
        lr,
        rate,
        _duration(eta),
        extra=LEADER_ONLY,
    )
    return mean


def evaluate(run: TrainingRun, batch_size: int) -> dict[str, float]:
    """Held-out metrics, summed over every rank's share of the eval set; recorded in the
    progress history and the metrics log, and returned."""
    model = (
        run.model.module
        if isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
        else run.model
    )
    training = model.training
    model.eval()
    sums: dict[str, float] = {}
    try:
        with torch.no_grad():
            # The same number of batches on every rank (maybe one empty): FSDP's forwards gather.
            env = run.env
            for indices in eval_batches(len(run.eval_data), batch_size, env.rank, env.world_size):
                out = run.task.eval_sums(model, _to(run.eval_data.batch(indices), run.device))
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
    finally:
        model.train(training)
    keys = sorted(sums)  # every rank ran the same batches, so has the same keys
    totals = dict(zip(keys, dist.all_reduce_sum([sums.get(k, 0.0) for k in keys]), strict=True))
    count = totals.pop("count", 0.0) or 1.0
    metrics = {f"eval/{k}": v / count for k, v in totals.items()}
    step = run.progress.step
    run.progress.history.append({"step": step, **metrics})
    run.metrics.record(step, metrics)
    text = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    log.info("eval at step %d: %s", step, text, extra=LEADER_ONLY)
    return metrics


def _stop(run: TrainingRun, latest: dict[str, float]) -> Outcome:
    """Every rank agreed to stop: save this step (after any save in flight), commit, return."""
    return commit_stop(run.progress.step, latest, run.ckpt, run.metrics, run.stop, run.grace_s)


def _finish(run: TrainingRun, trainer: TrainerConfig, latest: dict[str, float]) -> Outcome:
    step = run.progress.step
    if not run.progress.history or run.progress.history[-1]["step"] != step:
        latest.update(evaluate(run, trainer.batch_size))
    run.ckpt.save_final(step, latest)
    run.ckpt.close()  # with tiers, after the final upload, which records its `durable` line
    run.metrics.flush()  # the final eval's lines, when this step was saved before it ran
    return Outcome(True, step)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
