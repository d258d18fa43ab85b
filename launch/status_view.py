"""`stockpot status RUN`, the human view, and `--watch`, which redraws it every few seconds.

Everything shown is read from the run dir: metrics.jsonl (steps, speed, restarts), config.yaml
(max_steps, the launcher's time limit), the committed manifests and leftovers (inspect's report)
and jobs.json. `progress_report` is pure over those records, `render` is pure over the report:
both are tested without a terminal. On a TTY `--watch` clears the screen between frames; piped,
it prints plain frames one after another (no escape codes in logs).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from launch.job import counts_as_timeout

if TYPE_CHECKING:
    from orchestrator.storage import Store

RATE_WINDOW = 20  # progress lines the speed is measured over
BAR_WIDTH = 30
CLEAR = "\x1b[H\x1b[2J"


def progress_report(
    records: Sequence[Mapping[str, Any]], config: Mapping[str, Any], now: float
) -> dict[str, Any]:
    """Steps done of max, steps/s of the current life, ETA, and the restarts by cause."""
    trainer, launcher = config.get("trainer", {}), config.get("launcher", {})
    max_steps = trainer.get("max_steps")
    life = _current_life(records)
    steps = [r for r in life if "loss" in r]
    step = max((int(r["step"]) for r in records if "loss" in r), default=0)
    rate = _rate(steps[-RATE_WINDOW:])
    left = (max_steps - step) if max_steps is not None else None
    last_time = max((float(r["time"]) for r in records if "time" in r), default=None)
    return {
        "step": step,
        "max_steps": max_steps,
        "steps_per_s": rate,
        "eta_s": left / rate if rate and left and left > 0 else (0.0 if left == 0 else None),
        "last_line_age_s": None if last_time is None else max(0.0, now - last_time),
        "restarts": restart_causes(records, launcher),
        "tiers": tier_report(records),
    }


def tier_report(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Tiered checkpoints (checkpoint.local_dir), from metrics.jsonl: the newest commit on the
    nodes, the newest durable one in run.dir, the steps between them (at risk if a node is
    lost), and the local commits not made durable since. None for a run without tiers."""
    local = {int(r["step"]) for r in records if r.get("event") == "commit"
             and "checkpoint/steps_at_risk" in r}  # fmt: skip
    if not local:
        return None
    durable = {int(r["step"]) for r in records if r.get("event") == "durable"}
    newest_local, newest_durable = max(local), max(durable, default=None)
    return {
        "newest_local": newest_local,
        "newest_durable": newest_durable,
        "steps_at_risk": max(0, newest_local - (newest_durable or 0)),
        "local_only": sorted(s for s in local - durable if s > (newest_durable or 0)),
    }


def _current_life(records: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    starts = [i for i, r in enumerate(records) if r.get("event") == "resumed"]
    return records[starts[-1] :] if starts else records


def _rate(lines: Sequence[Mapping[str, Any]]) -> float | None:
    if len(lines) < 2:
        return None
    first, last = lines[0], lines[-1]
    dt = float(last["time"]) - float(first["time"])
    return (int(last["step"]) - int(first["step"])) / dt if dt > 0 else None


def restart_causes(
    records: Sequence[Mapping[str, Any]], launcher: Mapping[str, Any]
) -> dict[str, int]:
    """Each resume, by what ended the life before it: a saved stop on a signal (a time-out when
    it came near the Slurm time limit, submitit's rule; else a preemption) or a crash/kill that
    left no save (the run resumed from an older commit)."""
    causes = {"preemption": 0, "time-out": 0, "signal": 0, "crash": 0}
    stopped: Mapping[str, Any] | None = None
    for rec in records:
        if rec.get("event") == "stopped":
            stopped = rec
        elif rec.get("event") == "resumed":
            causes[_cause(stopped, launcher)] += 1
            stopped = None
    return {k: v for k, v in causes.items() if v}


def _cause(stopped: Mapping[str, Any] | None, launcher: Mapping[str, Any]) -> str:
    if stopped is None:
        return "crash"
    if launcher.get("kind") != "slurm":
        return "signal"  # run by hand: no time limit to compare with
    timed_out = counts_as_timeout(float(stopped.get("uptime_s", 0)), launcher["timeout_min"])
    return "time-out" if timed_out else "preemption"


def render(table: str, report: Mapping[str, Any], now: float) -> str:
    """`table` (inspect's checkpoint table), then, for a run that has trained (metrics.jsonl),
    where it stands: progress, speed and ETA, resumes by cause, the newest commit's age, a save
    in flight. `report` is inspect's status report plus `progress` (progress_report)."""
    lines = [table]
    p = report.get("progress") or {}
    if p.get("last_line_age_s") is None:
        return lines[0]
    lines.append(_progress_line(p))
    lines.append(f"last metrics line {_age(p['last_line_age_s'])} ago")
    lines.append("resumes by cause: " + _causes_text(p.get("restarts", {})))
    lines += _lives_lines(report.get("lives", []))
    rows = report["checkpoints"]
    if rows:
        lines.append(
            f"newest commit: step {rows[-1]['step']}, {_age(now - rows[-1]['created_at'])} ago"
        )
    tiers = p.get("tiers")
    if tiers:
        durable = tiers["newest_durable"]
        lines.append(
            f"tiers: newest commit on the nodes step {tiers['newest_local']}, newest durable "
            f"step {'-' if durable is None else durable}; steps at risk {tiers['steps_at_risk']}"
        )
        if tiers["local_only"]:
            steps = ", ".join(str(s) for s in tiers["local_only"][-8:])
            lines.append(f"on the nodes only (not durable yet): step {steps}")
    in_flight = _in_flight(report)
    if in_flight:
        lines.append(f"save in flight (not committed yet): {', '.join(in_flight)}")
    return "\n".join(lines)


LIVES_SHOWN = 8


def _lives_lines(lives: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each life of the run (orchestrator/ending.py): how it ended and why, newest last."""
    if not lives:
        return []
    counts: dict[str, int] = {}
    for life in lives:
        counts[life["class"]] = counts.get(life["class"], 0) + 1
    head = ", ".join(f"{n} {klass}" for klass, n in counts.items())
    lines = [f"lives: {len(lives)} ({head})"]
    if len(lives) > LIVES_SHOWN:
        lines.append(f"  ... {len(lives) - LIVES_SHOWN} earlier")
    for life in lives[-LIVES_SHOWN:]:
        step = "-" if life.get("step") is None else life["step"]
        lines.append(f"  {life['life']}  {life['class']:<13} step {step:<6} {life['cause'][:160]}")
    return lines


def _progress_line(p: Mapping[str, Any]) -> str:
    step, most = p.get("step", 0), p.get("max_steps")
    if not most:
        return f"step {step}"
    done = min(1.0, step / most)
    filled = round(done * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    rate = p.get("steps_per_s")
    speed = f"{rate:.2f} step/s" if rate else "? step/s"
    eta = p.get("eta_s")
    eta_text = "done" if step >= most else (f"ETA {_age(eta)}" if eta is not None else "ETA ?")
    return f"step {step}/{most} [{bar}] {done:.0%}  {speed}  {eta_text}"


def _causes_text(causes: Mapping[str, int]) -> str:
    if not causes:
        return "none"
    names = {"crash": "crash/kill (no save)", "signal": "stopped by a signal"}
    return ", ".join(f"{n} {names.get(kind, kind)}" for kind, n in causes.items())


def _step_of(path: str) -> int | None:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if name.startswith("step-") and digits else None


def _in_flight(report: Mapping[str, Any]) -> list[str]:
    """Leftovers newer than the newest commit: a save being written (or one a kill cut short)."""
    newest = report["checkpoints"][-1]["step"] if report["checkpoints"] else -1
    return [p for p in report["leftovers"] if (_step_of(p) or -1) > newest]


def _age(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def watch(frame: Callable[[], str], interval: float, out: Any = None) -> int:
    """Print `frame()` every `interval` seconds until Ctrl-C; clear between frames on a TTY."""
    out = out or sys.stdout
    tty = out.isatty()
    try:
        while True:
            text = frame()
            if tty:
                out.write(CLEAR + text + f"\n\n(every {interval:g} s; Ctrl-C to stop)\n")
            else:
                out.write(f"--- {time.strftime('%H:%M:%S')}\n{text}\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def run_progress(run: Store) -> dict[str, Any]:
    """progress_report of the run in `run` (metrics.jsonl and config.yaml), as of now."""
    from orchestrator.metrics import read_metrics

    return progress_report(read_metrics(run), _run_config(run), time.time())


def _run_config(run: Store) -> dict[str, Any]:
    """The run's resolved config.yaml as plain data ({} before the first start)."""
    import yaml  # plain YAML: this file is already resolved, no OmegaConf needed

    try:
        data = yaml.safe_load(run.read_bytes("config.yaml"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def show(frame: Callable[[], str], *, watch_every: float | None) -> int:
    """Print `frame()` once, or redraw it every `watch_every` seconds."""
    if watch_every is None:
        print(frame())
        return 0
    return watch(frame, watch_every)
