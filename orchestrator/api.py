"""Your own training loop, with stockpot's part of the job: `with training(cfg) as t:`.

    with orchestrator.training(cfg) as t:
        model = t.wrap(MyModel())                       # DDP or FSDP2, as trainer.parallel says
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
        loader = t.loader(MyDataset(), num_workers=2)   # resumes at the same sample
        t.register(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)
        batches = iter(loader)
        for step in t.steps():                          # resumes after the last checkpoint
            loss = model(*next(batches)).loss
            loss.backward()
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
            t.log(step, loss=loss)

`t.steps()` restores the newest committed checkpoint on its first call (or `t.restore()` does,
for a loop of its own), saves as the `checkpoint:` schedule says after each step, and ends
after the agreed stop's save when a preemption or time-out signal arrives on any rank: the job
then requeues and the next run continues exactly. Leaving the block after trainer.max_steps
saves the last step. Run the script's `main(cfg)` with `stockpot run`/`submit` and
`entrypoint: mypkg.train:main`, or call `training(cfg)` from a script torchrun starts (then
end it with `sys.exit(t.outcome.exit_code)`: 75 after a stop, so a requeue resumes it).

The script must not change parameters or optimizer state outside `optimizer.step()` while an
async save (checkpoint.async_save) is in flight: the save reads them from live memory until
the next `optimizer.step()` begins.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from orchestrator import dist
from orchestrator.cadence import StopChecks
from orchestrator.checkpoint.stateful import Stateful
from orchestrator.config import Config
from orchestrator.env import DistEnv
from orchestrator.logs import LEADER_ONLY, setup_logging
from orchestrator.session import RESERVED, Outcome, Session, commit_stop

log = logging.getLogger("stockpot.training")

# Under `stockpot run`/`submit`, how the entry point's training ended (orchestrator/entrypoint.py
# reads it after the script returns, for the exit code that requeues the job).
_last: list[Outcome] = []


@contextmanager
def training(cfg: Config, environ: Mapping[str, str] | None = None) -> Iterator[Training]:
    """Join the job (rank from Slurm, torchrun or `stockpot run`; the process group is created
    unless the script made it), check run.dir, catch the stop signals; on leaving, commit the
    last save. An exception leaves without saving (the previous checkpoint stays whole)."""
    env = DistEnv.from_environ(os.environ if environ is None else environ)
    if not logging.getLogger().handlers:  # a script torchrun started: stockpot's log lines
        setup_logging(env.rank)
    with Session(cfg, env) as session:
        t = Training(session)
        try:
            yield t
            t._leave()
        finally:
            if t._loader is not None and hasattr(t._loader, "close"):
                t._loader.close()  # its workers, before the rank's os._exit


class Training:
    """The handle `training()` gives a script; see the module's docstring."""

    def __init__(self, session: Session) -> None:
        self._s = session
        self.cfg, self.env, self.device = session.cfg, session.env, session.device
        self.max_steps = self.cfg.trainer.max_steps
        self.outcome: Outcome | None = None
        self._latest: dict[str, float] = {}  # newest logged values: what manifests record
        self._loader: Any = None
        self._checks: StopChecks | None = None
        self._offered = -1  # the last step offered to the save schedule
        self._rate = (0, time.monotonic())

    # -- building -------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def step(self) -> int:
        """Optimizer steps done (restored on resume)."""
        return self._s.progress.step

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` on this rank's device under DDP or FSDP2 (trainer.parallel, trainer.fsdp,
        trainer.mixed_precision), with the built-in loop's FSDP unit policy. Build the model
        inside the block: torch is seeded alike on every rank there."""
        return self._s.wrap(model)

    def loader(
        self,
        dataset: Any,
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = True,
    ) -> Any:
        """A data loader over a map-style `dataset` (`len`, `[i]`) whose position is saved and
        restored exactly: this rank's share of a seeded shuffle, `batch_size` samples per rank
        (default trainer.batch_size), `num_workers` worker processes (default
        trainer.num_workers), the same batches and augmentations for any number of workers.
        Iterating it never ends (epochs follow each other); register it as `loader=`."""
        from orchestrator.loader import ResumableLoader

        trainer = self.cfg.trainer
        return ResumableLoader(
            dataset,
            batch_size=trainer.batch_size if batch_size is None else batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            seed=self.cfg.run.seed,
            num_workers=trainer.num_workers if num_workers is None else num_workers,
            collate_fn=collate_fn,
            drop_last=drop_last,
        )

    def register(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Stateful | None = None,
        loader: Stateful | None = None,
        **others: Stateful,
    ) -> None:
        """What every checkpoint holds: the (wrapped) model and its optimizer under the names the
        export and soups read, the LR scheduler, the loader's position, and any object of yours
        with `state_dict()`/`load_state_dict()` (an EMA, a curriculum) under its keyword. Every
        rank's RNG streams are saved too, and trainer.ema's averages of the model (updated
        after each `optimizer.step()` by a hook). Call once, before `restore()`/`steps()`."""
        taken = sorted(set(others) & {"train", "scheduler", "sampler", *RESERVED})
        if taken:
            raise ValueError(f"register(): {', '.join(taken)} is a name stockpot uses; rename it")
        self._s.register_model(model, optimizer)  # and trainer.ema's averages, if any
        if scheduler is not None:
            self._s.register("scheduler", scheduler)
        if loader is not None:
            self._s.register("sampler", loader)  # the key the built-in sampler saves under
            self._loader = loader
        for name, obj in others.items():
            self._s.register(name, obj)

    def restore(self) -> int:
        """Load the newest committed checkpoint into everything registered; the step to go on
        from (0 on a fresh run). `steps()` calls it when the script has not."""
        step = self._s.restore()
        self._rate = (step, time.monotonic())
        return step

    # -- the loop -------------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        """The steps still to train, numbered from 1 (`step` is the count after the body's
        optimizer step). After each: the schedule's save, and a stop check posted before the
        step and answered after it (every step while steps are slow, about every 0.1 s when
        they are fast); on an agreed stop it saves, commits and ends."""
        if self._s.restored_step is None:
            self.restore()
        progress, stop = self._s.progress, self._s.stop
        checks = StopChecks(progress.step)
        while progress.step < self.max_steps and self.outcome is None:
            checks.post(progress.step, stop.requested)
            try:
                yield progress.step + 1
            except GeneratorExit:
                checks.answer(progress.step + 1)  # the break is the same on every rank
                raise
            progress.step += 1
            step = progress.step
            self.maybe_save(step)
            if checks.answer(step) and step < self.max_steps:
                self._stop(step)

    def should_stop(self, step: int) -> bool:
        """For a loop of its own, after `step` (and its `maybe_save`): True once every rank
        agreed to stop, after the stop's save committed; then leave the loop."""
        if self.outcome is not None:
            return True
        self._s.progress.step = step
        if self._checks is None:
            self._checks = StopChecks(step - 1)
        if self._checks.check(step, self._s.stop.requested) and step < self.max_steps:
            self._stop(step)
            return True
        return False

    def maybe_save(self, step: int, metrics: Mapping[str, float] | None = None) -> bool:
        """Offer `step` to the checkpoint schedule (every rank, after the step); `metrics`
        (e.g. eval/loss) are recorded in its manifest, for retention and soups by metric.
        `steps()` offers every step itself."""
        if self._s.restored_step is None:
            raise RuntimeError("maybe_save() before restore(): call t.restore() first")
        self._latest.update(_floats(metrics or {}))
        self._s.progress.step = step
        if step == self._offered:
            return False
        self._offered = step
        loader = self._loader
        return self._s.ckpt.maybe_save(
            step,
            self._latest,
            epoch_ended=bool(getattr(loader, "epoch_just_ended", False)),
            epoch=int(getattr(loader, "epoch", 0)),
        )

    def log(self, step: int, values: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Record `values` (numbers or 0-d tensors) at `step`, averaged over ranks: every rank
        calls it at the same steps. Rank 0 writes metrics.jsonl and TensorBoard (each step once,
        across resumes) and prints a progress line."""
        merged = _floats({**(values or {}), **more})
        keys = sorted(merged)
        sums = dist.all_reduce_sum([merged[k] for k in keys])
        means = {k: v / dist.world_size() for k, v in zip(keys, sums, strict=True)}
        self._latest.update(means)
        self._s.metrics.record(step, means)
        done, since = self._rate
        now = time.monotonic()
        self._rate = (step, now)
        text = " ".join(f"{k} {v:.4g}" for k, v in means.items())
        if step > done:
            text += f" {(step - done) / max(now - since, 1e-9):.1f} step/s"
        log.info("step %d/%d %s", step, self.max_steps, text, extra=LEADER_ONLY)

    # -- leaving --------------------------------------------------------------------------

    def _stop(self, step: int) -> None:
        s = self._s
        self.outcome = commit_stop(
            step, self._latest, s.ckpt, s.metrics, s.stop, s.cfg.launcher.signal_delay_s
        )

    def _leave(self) -> None:
        """The block ended without an exception: unless stopped, commit the last step."""
        s = self._s
        if self.outcome is None and s.restored_step is not None:
            step = s.progress.step
            if step < self.max_steps:
                log.warning(
                    "left training() at step %d of trainer.max_steps=%d without a stop signal: "
                    "saved as finished",
                    step,
                    self.max_steps,
                    extra=LEADER_ONLY,
                )
            s.ckpt.save_final(step, self._latest)
            s.ckpt.close()  # with tiers, after the final upload (its `durable` line)
            s.metrics.flush()
            self.outcome = Outcome(True, step)
        elif self.outcome is None:  # nothing was registered: nothing to save
            self.outcome = Outcome(True, s.progress.step)
        _last.append(self.outcome)


def last_outcome() -> Outcome | None:
    """The outcome of the newest `training()` block of this process (None: none ended)."""
    return _last[-1] if _last else None


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        number = value.item() if isinstance(value, torch.Tensor) else value
        if not isinstance(number, int | float) or isinstance(number, bool):
            raise TypeError(f"metric {key!r} must be a number or a 0-d tensor (got {value!r})")
        out[key] = float(number)
    return out
