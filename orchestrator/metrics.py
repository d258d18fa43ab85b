"""`<run.dir>/metrics.jsonl`: one JSON object per line, written by the leader only.

Lines carry `step`, `restart` (how many times the run had been resumed) and `time`; a run that
is killed and resumed repeats the steps it lost, so readers take the LAST line per step.
Special lines carry `event`: `resumed` (this life started from the checkpoint of that step) and
`commit` (a checkpoint of that step committed, with its `checkpoint/*_s` timings).

Every line is also sent to TensorBoard when a writer is given (orchestrator/tensorboard.py):
numbers as scalars, events as text and as `events/*` scalars, so restarts and commits show on
the step axis next to the curves.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.storage import Store

if TYPE_CHECKING:
    from orchestrator.tensorboard import TensorBoardWriter

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(
        self,
        run: Store,
        *,
        enabled: bool,
        restart: int = 0,
        tensorboard: TensorBoardWriter | None = None,
    ) -> None:
        self.run, self.enabled, self.restart = run, enabled, restart
        self.tensorboard = tensorboard if enabled else None
        self._pending: list[str] = []
        self._born = time.monotonic()  # built at the start of the rank's process
        # An async save commits on the checkpointer's thread while the loop records steps.
        self._lock = threading.Lock()

    def record(self, step: int, values: Mapping[str, float], **extra: Any) -> None:
        if not self.enabled:
            return
        line = {
            "step": step,
            **{k: _finite(v) for k, v in values.items()},
            **extra,
            "restart": self.restart,
            "time": round(time.time(), 3),
        }
        with self._lock:
            self._pending.append(json.dumps(line, sort_keys=True))
            if self.tensorboard is not None:
                _to_tensorboard(self.tensorboard, step, values, extra)

    def start(self, step: int, resumes: int, *, tensorboard: bool = False) -> None:
        """Mark where this life begins (a `resumed` line when it restored a checkpoint) and open
        its TensorBoard writer, which hides what earlier lives logged after `step`."""
        if self.enabled and tensorboard and self.tensorboard is None:
            from orchestrator.tensorboard import open_writer

            self.tensorboard = open_writer(self.run, enabled=True, start_step=step)
        if resumes:
            self.record(step, {}, event="resumed", resumes=resumes)

    def stopped(self, step: int, signal: str) -> None:
        """This life saved and stopped on a signal: `uptime_s` lets `status` tell a time-out
        (near the job's time limit) from a preemption."""
        uptime = round(time.monotonic() - self._born, 3)
        self.record(step, {}, event="stopped", signal=signal or "another rank", uptime_s=uptime)

    def commit(self, step: int, timings: Mapping[str, float]) -> None:
        """A checkpoint of `step` committed (the checkpointer's on_commit, leader only)."""
        self.record(step, {f"checkpoint/{k}": v for k, v in timings.items()}, event="commit")

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.run.append_bytes(METRICS_NAME, ("\n".join(self._pending) + "\n").encode())
                self._pending.clear()
            if self.tensorboard is not None:
                self.tensorboard.flush()


def _to_tensorboard(
    writer: TensorBoardWriter, step: int, values: Mapping[str, float], extra: Mapping[str, Any]
) -> None:
    from orchestrator.tensorboard import scalar_values

    writer.scalars(step, scalar_values(dict(values)))
    event = extra.get("event")
    if event == "resumed":
        writer.scalars(step, {"events/resumes": float(extra.get("resumes", 1))})
        writer.text(step, "events", f"resumed from the checkpoint of step {step}")
    elif event == "stopped":
        writer.text(step, "events", f"stopped by {extra.get('signal')} after saving step {step}")
    elif event == "commit":
        writer.scalars(step, {"events/commit": 1.0})
        writer.text(step, "events", f"checkpoint of step {step} committed")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_metrics(run: Store) -> list[dict[str, Any]]:
    try:
        raw = run.read_bytes(METRICS_NAME)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def last_per_step(records: list[dict[str, Any]], key: str) -> dict[int, Any]:
    """{step: value of `key` in the last line of that step that has it}."""
    out: dict[int, Any] = {}
    for rec in records:
        if key in rec:
            out[rec["step"]] = rec[key]
    return out
