"""Signals that ask the job to stop: the handlers only set a flag.

Saving inside a handler would race the training step and run on one rank only. Instead the loop
asks every rank at the next step boundary (`dist.agree`), and all of them save together.
USR2 is what submitit asks Slurm to send before the time limit (USR1 is avoided: NCCL may catch
it); SIGTERM is what Slurm sends on preemption and scancel.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


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
            self._previous[signum] = signal.signal(signum, self._handle)
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
