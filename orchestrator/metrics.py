"""`<run.dir>/metrics.jsonl`: one JSON object per line, written by the leader only.

Lines carry `step`, `restart` (how many times the run had been resumed) and `time`; a run that
is killed and resumed repeats the steps it lost, so readers take the LAST line per step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from orchestrator.storage import Store

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run: Store, *, enabled: bool, restart: int = 0) -> None:
        self.run, self.enabled, self.restart = run, enabled, restart
        self._pending: list[str] = []

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
        self._pending.append(json.dumps(line, sort_keys=True))

    def flush(self) -> None:
        if self._pending:
            self.run.append_bytes(METRICS_NAME, ("\n".join(self._pending) + "\n").encode())
            self._pending.clear()


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
