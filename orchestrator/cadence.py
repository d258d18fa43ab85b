"""Which steps the ranks agree on a stop at (shared by the built-in loop and `training()`).

Every step while steps take longer than CHECK_S, else every k-th, k chosen so about CHECK_S of
training passes between checks (at most MAX_EVERY steps). k is agreed with the stop flag itself
(the smallest rank's proposal), so every rank checks on the same steps. A collective costs a
fast step ~0.1 ms of gloo; a stop still happens at a step boundary, at most ~CHECK_S after a
rank saw the signal.
"""

from __future__ import annotations

import time

from orchestrator import dist


class StopChecks:
    CHECK_S, MAX_EVERY = 0.1, 64

    def __init__(self, step: int) -> None:
        self.next = step  # the step before which the next check is posted
        self.pending: dist.PendingAgreement | None = None
        self.last_step, self.last_time = step, time.perf_counter()

    def post(self, step: int, requested: bool) -> bool:
        """Before the step after `step`: post the agreement if that step is checked (answered
        by `answer` after the step, so the reduction overlaps it)."""
        if step != self.next:
            return False
        self.pending = dist.PendingAgreement(requested, every=self._propose(step))
        return True

    def answer(self, step: int) -> bool:
        """True if the ranks agreed to stop after `step` (only on checked steps)."""
        if self.pending is None:
            return False
        stop, every = self.pending.result(), self.pending.every
        self.pending = None
        self.next = step - 1 + every
        return stop

    def check(self, step: int, requested: bool) -> bool:
        """After `step`, in one call (a loop that cannot post before its steps): agree now if
        this step is checked. Steps may be skipped between calls; a check is never missed."""
        if step < self.next:
            return False
        agreement = dist.PendingAgreement(requested, every=self._propose(step))
        stop = agreement.result()
        self.next = step + agreement.every
        return stop

    def _propose(self, step: int) -> int:
        now = time.perf_counter()
        steps = step - self.last_step
        propose = 1
        if steps > 0:
            per_step = (now - self.last_time) / steps
            propose = max(1, min(self.MAX_EVERY, round(self.CHECK_S / max(per_step, 1e-9))))
        self.last_step, self.last_time = step, now
        return propose
