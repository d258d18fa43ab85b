"""The training loop. Short on purpose: what to do at each step is decided by the components
(sampler, checkpointer, stop flag, metrics log); the loop only calls them in order.

Every rank runs the same sequence of collectives: the stop check (posted before each step,
answered after it), metric reductions at log/eval steps, and the checkpointer's own collectives.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator import dist, parallel
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.config import CheckpointConfig, TrainerConfig
from orchestrator.data import ResumableSampler
from orchestrator.env import DistEnv
from orchestrator.metrics import MetricsLog
from orchestrator.preemption import StopFlag
from orchestrator.progress import Progress
from orchestrator.tasks.base import eval_batches

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything one rank trains with, built by `runner.build`."""

    env: DistEnv
    device: str
    task: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_data: Any
    eval_data: Any
    sampler: ResumableSampler
    progress: Progress
    ckpt: Checkpointer
    metrics: MetricsLog
    stop: StopFlag
    latest: dict[str, float] = field(default_factory=dict)  # newest loss/eval, for manifests


@dataclass(frozen=True)
class Outcome:
    finished: bool  # reached trainer.max_steps (else stopped by a signal, after saving)
    step: int
    signal: str = ""
    save_s: float | None = None  # how long the stop's save took, signal to commit


def train(p: Parts, t: TrainerConfig, c: CheckpointConfig) -> Outcome:
    saved_at = p.progress.step  # restored from (or 0): never saved twice
    last_save = time.monotonic()
    window = _Window(p.progress.step)
    while p.progress.step < t.max_steps:
        # Posted before the step, answered after it: a stop seen by any rank when this step
        # began ends the run after it, on every rank, without a stall at each boundary.
        stop = dist.PendingAgreement(p.stop.requested)
        loss, epoch_ended = _train_step(p, t)
        p.progress.step += 1
        step = p.progress.step
        if step % t.log_every == 0:
            _log_progress(p, t, step, loss, window)
        if t.eval_every and step % t.eval_every == 0:
            evaluate(p, t.batch_size)
        if _save_due(c, step, epoch_ended, p.sampler.epoch, last_save):
            # Metrics first: once the checkpoint commits, a resume never re-runs these steps,
            # so their lines must already be durable (a kill in between would lose them).
            p.metrics.flush()
            p.ckpt.save(step, p.latest)
            saved_at, last_save = step, time.monotonic()
        if stop.result() and step < t.max_steps:  # at max_steps: finish normally instead
            return _stop(p, saved_at)
    return _finish(p, t, saved_at)


def _train_step(p: Parts, t: TrainerConfig) -> tuple[torch.Tensor, bool]:
    p.model.train()
    total = torch.zeros((), device=p.device)
    epoch_ended = False
    for _ in range(t.grad_accum_steps):
        batch = _to(p.train_data.batch(p.sampler.next_indices()), p.device)
        epoch_ended |= p.sampler.epoch_just_ended
        with parallel.autocast(p.device, t.parallel, t.mixed_precision):
            loss = p.task.loss(p.model, batch) / t.grad_accum_steps
        loss.backward()
        total += loss.detach().float()
    if t.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(p.model.parameters(), t.grad_clip)
    p.optimizer.step()
    p.scheduler.step()
    p.optimizer.zero_grad(set_to_none=True)
    return total, epoch_ended


def _to(batch: tuple[torch.Tensor, ...], device: str) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(device, non_blocking=True) for x in batch)


def _save_due(
    c: CheckpointConfig, step: int, epoch_ended: bool, epoch: int, last_save: float
) -> bool:
    by_steps = c.every_steps is not None and step % c.every_steps == 0
    by_epochs = c.every_epochs is not None and epoch_ended and epoch % c.every_epochs == 0
    by_time = c.every_minutes is not None and dist.agree(
        time.monotonic() - last_save >= 60 * c.every_minutes  # clocks differ: any rank decides
    )
    return by_steps or by_epochs or by_time


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
    p: Parts, t: TrainerConfig, step: int, loss: torch.Tensor, window: _Window
) -> None:
    (loss_sum,) = dist.all_reduce_sum([float(loss)])
    mean = loss_sum / dist.world_size()
    lr = float(p.scheduler.get_last_lr()[0])
    p.latest["loss"] = mean
    p.metrics.record(step, {"loss": mean, "lr": lr})
    if p.env.is_leader:
        rate = window.rate(step)
        eta = (t.max_steps - step) / rate if rate > 0 else math.inf
        log.info(
            "step %d/%d loss %.4f lr %.3g %.1f step/s ETA %s",
            step,
            t.max_steps,
            mean,
            lr,
            rate,
            _duration(eta),
        )


def evaluate(p: Parts, batch_size: int) -> dict[str, float]:
    """Held-out metrics, summed over every rank's share of the eval set."""
    model = (
        p.model.module
        if isinstance(p.model, torch.nn.parallel.DistributedDataParallel)
        else p.model
    )
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        # The same number of batches on every rank (maybe one empty): FSDP's forwards gather.
        for indices in eval_batches(len(p.eval_data), batch_size, p.env.rank, p.env.world_size):
            out = p.task.eval_sums(model, _to(p.eval_data.batch(indices), p.device))
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value)
    keys = sorted(sums)  # every rank ran the same batches, so has the same keys
    totals = dict(zip(keys, dist.all_reduce_sum([sums.get(k, 0.0) for k in keys]), strict=True))
    count = totals.pop("count", 0.0) or 1.0
    metrics = {f"eval/{k}": v / count for k, v in totals.items()}
    p.latest.update(metrics)
    p.progress.history.append({"step": p.progress.step, **metrics})
    p.metrics.record(p.progress.step, metrics)
    if p.env.is_leader:
        log.info(
            "eval at step %d: %s",
            p.progress.step,
            " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )
    return metrics


def _stop(p: Parts, saved_at: int) -> Outcome:
    """Every rank agreed to stop: save this step (after any save in flight), commit, return."""
    step = p.progress.step
    t0 = time.monotonic()
    p.metrics.flush()  # before the commit, as in the loop
    if saved_at != step:
        p.ckpt.save(step, p.latest)
    p.ckpt.wait()
    since_signal = time.monotonic() - (p.stop.received_at or t0)
    if p.env.is_leader:
        log.warning(
            "stop requested (%s): step %d committed %.2f s after the signal; run again to resume",
            p.stop.signal_name or "another rank",
            step,
            since_signal,
        )
    return Outcome(False, step, p.stop.signal_name, since_signal)


def _finish(p: Parts, t: TrainerConfig, saved_at: int) -> Outcome:
    step = p.progress.step
    if not p.progress.history or p.progress.history[-1]["step"] != step:
        evaluate(p, t.batch_size)
    p.metrics.flush()  # before the commit, as in the loop
    if step > saved_at:
        p.ckpt.save(step, p.latest)
    p.ckpt.close()
    return Outcome(True, step)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
