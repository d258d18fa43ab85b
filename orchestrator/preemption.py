"""Signals that ask the job to stop: the handlers only set a flag.

Saving inside a handler would race the training step and run on one rank only. Instead the loop
asks every rank at the next step boundary (`dist.agree`), and all of them save together.
USR2 is what submitit asks Slurm to send before the time limit (USR1 is avoided: NCCL may catch
it); SIGTERM is what Slurm sends on preemption and scancel.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

log = logging.getLogger(__name__)

# Signals that arrived before training began (during imports and the rendezvous): without a
# handler that early, SIGUSR2's default action kills the rank (exit 140) mid start-up.
_early: list[tuple[int, float]] = []


def _record_early(signum: int, frame: FrameType | None) -> None:
    if not _early:
        _early.append((signum, time.monotonic()))


def catch_early(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Call first thing in a rank's process; a StopFlag installed later picks the signal up."""
    for signum in signals:
        signal.signal(signum, _record_early)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS) -> StopFlag:
        for signum in signals:
            previous = signal.signal(signum, self._handle)
            self._previous[signum] = signal.SIG_DFL if previous is _record_early else previous
        if _early and self.signum is None:
            self.signum, self.received_at = _early[0]
            # Said here, not in _record_early: logging is not safe inside a signal handler.
            # Tests read this line to tell the start-up path from a stop during training.
            log.warning(
                "%s arrived during start-up, before training began: kept, stopping after the first step",
                self.signal_name,
            )
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def ignore_stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """In a helper process of a rank (a data loader worker): a stop request is the rank's to
    act on. Slurm signals every process of a step, so a helper that died of SIGTERM or SIGUSR2
    (their default action) would fail the rank's save; ignored, it is torn down by the rank."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)
