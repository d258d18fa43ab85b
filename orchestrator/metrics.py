"""`<run.dir>/metrics.jsonl`: one JSON object per line, written by the leader only.

Lines carry `step`, `restart` (how many times the run had been resumed) and `time`; a run that
is killed and resumed repeats the steps it lost, so readers take the LAST line per step.
Special lines carry `event`: `resumed` (this life started from the checkpoint of that step),
`commit` (a checkpoint of that step committed, with its `checkpoint/*_s` timings; a life killed
between a commit and its next flush loses that line, and the life resumed from the commit
records it again, without timings) and `startup` (this life's first step is done: how long
each phase of its start took, `startup/*_s`, see `StartupClock`).

Every line is also sent to the sinks `start` opens (TensorBoard: orchestrator/tensorboard.py):
numbers as scalars, events as text and as `events/*` scalars, so restarts and commits show on
the step axis next to the curves: each committed step's mark once, wherever kills landed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from orchestrator.errors import StorageError, one_line
from orchestrator.storage import Store, redact

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
_LINE_KEYS = ("step", "event", "restart", "time")  # what `record` adds; the rest are values
HOLD_RETRY_S = 10.0  # how often `flush_soon` tries a run.dir that did not answer


class Sink(Protocol):
    """Where lines also go: TensorBoard (orchestrator/tensorboard.py), W&B (wandb_log.py)."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, step: int, tag: str, text: str) -> None: ...

    def flush(self) -> None: ...


class MetricsLog:
    def __init__(
        self,
        run: Store,
        *,
        enabled: bool,
        restart: int = 0,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.run, self.enabled, self.restart = run, enabled, restart
        self.sinks: list[Sink] = list(sinks or []) if enabled else []
        self._pending: list[str] = []
        self._held_since: float | None = None  # run.dir stopped answering a flush (monotonic)
        self._tried = 0.0  # the last append's start (monotonic)
        self._appending = threading.Lock()  # one append at a time (flush_soon's thread)
        self._writer: threading.Thread | None = None
        self._wake = threading.Event()
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
            for sink in list(self.sinks):
                self._guarded(sink, functools.partial(_to_sink, sink, step, values, extra))

    def start(
        self,
        step: int,
        resumes: int,
        *,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        name: str = "",
    ) -> None:
        """Open this life's sinks and, when it restored the checkpoint of `step`, mark that
        (`_resumed`): TensorBoard hides what earlier lives logged from `step` on; W&B continues
        the run's W&B run. Leader only; a sink whose package is missing is skipped with a
        warning. TensorBoard's writer opens later (`open_deferred`, after the life's first
        step; at the latest, the first flush): what is recorded until then waits for it."""
        if not self.enabled:
            return
        from orchestrator.tensorboard import writer_opener
        from orchestrator.wandb_log import open_wandb

        opener = writer_opener(self.run, enabled=tensorboard, start_step=step)
        board = None if opener is None else Deferred(opener)
        opened = [board, open_wandb(self.run, wandb_project, name or self.run.path())]
        self.sinks += [sink for sink in opened if sink is not None]
        if resumes:
            self._resumed(step, resumes, board)

    def open_deferred(self) -> None:
        """Open the sinks `start` deferred, and send them what was recorded since, in order."""
        with self._lock:
            for sink in list(self.sinks):
                if isinstance(sink, Deferred) and not sink.opened:
                    sink.open()  # a writer that cannot open fails the run, as it always did
                    self._guarded(sink, sink.replay)

    def _resumed(self, step: int, resumes: int, board: Sink | None) -> None:
        """This life resumed from the commit of `step`. TensorBoard's writer hid what earlier
        lives drew at `step`: drawn again from metrics.jsonl's lines. The commit's own line is
        missing when the life that made it was killed before its next flush: recorded here,
        so every commit has its line and its one TensorBoard mark, wherever the kill landed."""
        lines = self._lines_of(step)
        if board is not None:
            self._guarded(board, lambda: _redraw(board, step, lines))
        if not any(line.get("event") == "commit" for line in lines):
            self.record(step, {}, event="commit")
        self.record(step, {}, event="resumed", resumes=resumes)

    def stopped(self, step: int, signal: str) -> None:
        """This life saved and stopped on a signal: `uptime_s` lets `status` tell a time-out
        (near the job's time limit) from a preemption."""
        uptime = round(time.monotonic() - self._born, 3)
        self.record(step, {}, event="stopped", signal=signal or "another rank", uptime_s=uptime)

    def started(self, step: int, clock: StartupClock) -> None:
        """This life's first step, `step`, is done: how long each phase of its start took."""
        self.record(step, clock.seconds(), event="startup")

    def commit(self, step: int, timings: Mapping[str, float]) -> None:
        """A checkpoint of `step` committed (the checkpointer's on_commit, leader only)."""
        self.record(step, {f"checkpoint/{k}": v for k, v in timings.items()}, event="commit")

    def durable(self, step: int, upload_s: float, at_risk: int) -> None:
        """Tiered checkpoints: `step` is durable (uploaded in `upload_s`); `at_risk` steps
        since are on the local tier only (the uploader's on_durable, leader only)."""
        values = {"checkpoint/upload_s": upload_s, "checkpoint/steps_at_risk": at_risk}
        self.record(step, values, event="durable")

    def flush(self, *, hold_on_failure: bool = False) -> None:
        """Append what was recorded to metrics.jsonl and flush the sinks. With
        `hold_on_failure`, a run.dir that does not answer keeps the lines in memory for the
        next flush, with one warning per outage; otherwise its error fails the caller."""
        self.open_deferred()  # a flush before a commit writes everything recorded so far
        self._append(hold_on_failure)
        with self._lock:
            for sink in list(self.sinks):
                self._guarded(sink, sink.flush)

    def flush_soon(self) -> None:
        """`flush` on a thread of its own, holding the lines while run.dir does not answer
        (tiered checkpoints: a save commits on the nodes and waits neither for run.dir nor for
        its retries). A held flush is tried again every HOLD_RETRY_S, and at the next call."""
        if not self.enabled:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_soon, name="stockpot-metrics",
                                            daemon=True)  # fmt: skip
            self._writer.start()
        self._wake.set()

    @property
    def held(self) -> int:
        """Lines a failed flush holds in memory (lost if the process ends first)."""
        return len(self._pending) if self._held_since is not None else 0

    def _write_soon(self) -> None:
        while True:
            self._wake.wait(timeout=None if self._held_since is None else HOLD_RETRY_S)
            self._wake.clear()
            if self._held_since is not None and time.monotonic() - self._tried < HOLD_RETRY_S:
                continue  # a save during an outage: its lines wait for the next try
            self.flush(hold_on_failure=True)

    def _append(self, hold_on_failure: bool) -> None:
        """metrics.jsonl gets the pending lines; one appender at a time, and `record` goes on
        meanwhile (the lines it adds wait for the next append)."""
        with self._appending:
            with self._lock:
                lines = list(self._pending)
            if not lines:
                return
            self._tried = time.monotonic()
            try:
                self.run.append_bytes(METRICS_NAME, ("\n".join(lines) + "\n").encode())
            except (StorageError, OSError) as exc:
                if not hold_on_failure:
                    raise
                if self._held_since is None:
                    self._held_since = self._tried
                    log.warning(
                        "metrics: cannot append to %s (%s); training goes on, its lines are "
                        "held in memory and written once it answers (lost if this life ends "
                        "first)",
                        self.run.path(METRICS_NAME),
                        redact(one_line(exc)),
                    )
                return
            with self._lock:
                del self._pending[: len(lines)]
            if self._held_since is not None:
                log.warning(
                    "metrics: %s answers again after %.0f s; %d held line(s) written",
                    self.run.path(METRICS_NAME),
                    time.monotonic() - self._held_since,
                    len(lines),
                )
                self._held_since = None

    def _lines_of(self, step: int) -> list[dict[str, Any]]:
        """The lines of `step` in metrics.jsonl, oldest first; a line torn by a kill is skipped."""
        try:
            raw = self.run.read_bytes(METRICS_NAME)
        except FileNotFoundError:
            return []
        found = []
        for text in raw.splitlines():
            if str(step).encode() not in text:  # most lines: no JSON parse
                continue
            try:
                line = json.loads(text)
            except ValueError:
                continue
            if isinstance(line, dict) and line.get("step") == step:
                found.append(line)
        return found

    def _guarded(self, sink: Sink, call: Callable[[], None]) -> None:
        """A sink that fails (disk full, W&B down) is dropped with a warning: it must never
        fail training, nor a commit (`commit` runs inside the checkpointer's commit)."""
        try:
            call()
        except Exception as exc:
            log.warning(
                "metrics: %s failed (%s); no longer logging to it", type(sink).__name__, exc
            )
            self.sinks.remove(sink)


class Deferred:
    """A sink opened later (`open`, then `replay`): until then its calls wait, in order.
    TensorBoard's writer imports tensorboard and protobuf, ~0.2 s that a restarted life need
    not spend before its first step."""

    def __init__(self, opener: Callable[[], Sink]) -> None:
        self._opener = opener
        self._waiting: list[Callable[[Sink], None]] = []
        self._sink: Sink | None = None

    @property
    def opened(self) -> bool:
        return self._sink is not None

    def open(self) -> None:
        if self._sink is None:
            self._sink = self._opener()

    def replay(self) -> None:
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            self._send(call)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._send(lambda sink: sink.scalars(step, values))

    def text(self, step: int, tag: str, text: str) -> None:
        self._send(lambda sink: sink.text(step, tag, text))

    def flush(self) -> None:
        self._send(lambda sink: sink.flush())

    def _send(self, call: Callable[[Sink], None]) -> None:
        if self._sink is None:
            self._waiting.append(call)
        else:
            call(self._sink)


# Set by orchestrator.standby in a process started before its life: when it became a rank.
HANDED_OVER_VAR = "STOCKPOT_HANDED_OVER_AT"


class StartupClock:
    """When each phase of this rank's start ended, for the `startup` line: from the process's
    start to its first step, split where a restart's time goes (make bench: bench/load.py).
    Phases are marked in order (`Session`: imports, rendezvous, build, restore, logs,
    first_step); each lasts from the end of the one before, the first from the process's start
    (unknown off Linux: then the split starts at the second), or from a standby's hand-over
    (orchestrator.standby: its imports done, it read its life's environment)."""

    def __init__(self) -> None:
        self._ends: list[tuple[str, float]] = []
        handed_over = os.environ.get(HANDED_OVER_VAR)  # a standby's wait is no start-up
        self._start = float(handed_over) if handed_over else process_start_time()

    def mark(self, phase: str) -> None:
        """`phase` ended now; a phase marked again keeps its first end."""
        if all(name != phase for name, _ in self._ends):
            self._ends.append((phase, time.time()))

    def seconds(self) -> dict[str, float]:
        """`startup/<phase>_s` for each phase marked, and `startup/total_s` (their sum)."""
        out, before = {}, self._start
        for phase, end in self._ends:
            if before is not None:
                out[f"startup/{phase}_s"] = round(end - before, 3)
            before = end
        out["startup/total_s"] = round(sum(out.values()), 3)
        return out


def process_start_time() -> float | None:
    """When this process started (wall clock, to the kernel's 10 ms tick); None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # the command name may hold spaces
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


def _to_sink(
    writer: Sink, step: int, values: Mapping[str, float], extra: Mapping[str, Any]
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


def _redraw(board: Sink, step: int, lines: list[dict[str, Any]]) -> None:
    """Step `step` as `lines` (metrics.jsonl's, oldest first) have it, once: the last value of
    each metric, the commit's mark, a `stopped` event's text. Earlier lives' `resumed` marks
    there are left out: the life drawing it records its own."""
    values: dict[str, Any] = {}
    events: dict[str, dict[str, Any]] = {}
    for line in lines:
        event = line.get("event")
        if event in (None, "commit"):
            values.update({k: v for k, v in line.items() if k not in _LINE_KEYS})
        if event in ("commit", "stopped"):
            events[event] = line
    _to_sink(board, step, values, {})
    for extra in events.values():
        _to_sink(board, step, {}, extra)


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
