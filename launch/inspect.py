"""The CLI's read-only commands: `stockpot status`, `stockpot verify`, `stockpot export`.

`status` also shows what `stockpot submit` recorded (launch/jobs.py: jobs.json, with each job's
state from `squeue` when Slurm is reachable) and the restart count from metrics.jsonl.

Where the S3 settings come from: `status` and `verify` take a run directory URL or the run's YAML
config (with key=value overrides, as given to `submit`). With a config, its run.dir is opened
with its `storage` section (for S3: endpoint, region, profile, attempts), exactly as `run` and
`submit` open it. With a URL there is no config to read first (the run's own config.yaml sits
behind the endpoint), so the AWS_* environment decides (AWS_ENDPOINT_URL, AWS_REGION,
AWS_PROFILE).

None of them needs a process group or the model's code: they read manifests, and `export` reads
tensors one bounded batch at a time (orchestrator/checkpoint/export.py). Heavy modules (torch,
fsspec) are imported inside the commands so `stockpot --help` stays fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from launch.jobs import JOBS_NAME, job_state, read_jobs
from orchestrator import ending  # no torch: light
from orchestrator.checkpoint.format import CHECKPOINTS_DIR, MANIFEST_NAME  # no torch: light
from orchestrator.errors import CheckpointCorrupt, UsageError

if TYPE_CHECKING:
    from orchestrator.checkpoint.catalog import Scan
    from orchestrator.storage import Store

CONFIG_SUFFIXES = (".yaml", ".yml")


def _store(url: str) -> Store:
    from orchestrator.storage import Store

    return Store(url)


def open_target(target: str, overrides: Sequence[str] = ()) -> Store:
    """The store a command names: a YAML config file -> its run.dir with its storage section
    (the same store `submit` and `run` open); anything else -> that URL, default settings (S3's
    from AWS_*)."""
    if target.endswith(CONFIG_SUFFIXES) and os.path.isfile(target):
        from orchestrator import config
        from orchestrator.storage import Store

        cfg = config.load(target, list(overrides))
        return Store(cfg.run.dir, cfg.storage)
    if overrides:
        raise UsageError(
            f"key=value overrides ({overrides[0]}, ...) need a config file, not a directory"
        )
    return _store(target)


def _name_of(store: Store) -> str:
    return store.path().rstrip("/").rsplit("/", 1)[-1]


# --- status ------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from launch import status_view  # the human view and --watch

    run = _check_run(open_target(args.run_dir, args.overrides))
    if args.json:
        print(json.dumps(_report(run), indent=1))
        return 0

    def frame() -> str:
        report = _report(run)
        report["progress"] = status_view.run_progress(run)
        return status_view.render(format_status(run.path(), report), report, time.time())

    return status_view.show(frame, watch_every=args.watch)


def _report(run: Store) -> dict[str, Any]:
    from orchestrator.checkpoint import catalog

    report = status_report(run, catalog.scan(run))
    report.update(activity_report(run))
    return report


def _check_run(run: Store) -> Store:
    if not run.exists(""):
        raise UsageError(f"run directory {run.path()} does not exist")
    if not run.exists(CHECKPOINTS_DIR) and not run.exists(JOBS_NAME):  # submitted, not started
        raise UsageError(f"{run.path()} is not a run directory (it has no {CHECKPOINTS_DIR}/)")
    return run


def activity_report(run: Store) -> dict[str, Any]:
    """`restarts` (Slurm requeues) and `resumes` (from metrics.jsonl), and `jobs` (from
    jobs.json, with their Slurm state), each only when the run has that file."""
    from orchestrator.metrics import read_metrics

    out: dict[str, Any] = {}
    metrics = read_metrics(run)
    if metrics:
        out["restarts"] = max(int(line.get("restart", 0)) for line in metrics)
        out["resumes"] = sum(1 for line in metrics if line.get("event") == "resumed")
    lives = ending.lives(ending.read_ends(run))
    if lives:
        out["lives"] = lives
    if run.exists(JOBS_NAME):
        out["jobs"] = [
            {**job, "state": job_state(job), "lives": _lives_of(str(job["job_id"]), lives)}
            for job in read_jobs(run)
        ]
    return out


def _lives_of(job_id: str, lives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's lives: `JOBID-REQUEUE-RESTART` (launch/templates/supervise.sh names them)."""
    return [life for life in lives if life["life"].startswith(f"{job_id}-")]


def status_report(run: Store, found: Scan) -> dict[str, Any]:
    """The `status --json` document: full paths, ascending steps, JSON-safe metrics."""
    return {
        "checkpoints": [
            {
                "step": info.step,
                "path": run.path(info.rel),
                "metrics": _json_metrics(info.metrics),
                "bytes": info.manifest.total_bytes,
                "created_at": info.manifest.created_at,
                # weights: retention dropped its optimizer state (a soup ingredient; not resumable)
                "kind": "weights" if info.manifest.weights_only else "full",
            }
            for info in found.committed
        ],
        "leftovers": [run.path(rel) for rel in found.leftovers],
        "corrupt": [{"path": run.path(rel), "reason": reason} for rel, reason in found.corrupt],
    }


def _json_metrics(metrics: Mapping[str, float]) -> dict[str, float | None]:
    # NaN/inf are not JSON; a diverged loss shows as null rather than breaking every parser.
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def format_status(run_url: str, report: Mapping[str, Any]) -> str:
    """A compact table of committed checkpoints, then one line per leftover or corrupt entry."""
    rows = report["checkpoints"]
    lines = [f"{run_url}: {len(rows)} committed checkpoint{'s' if len(rows) != 1 else ''}"]
    if rows:
        lines.append(f"{'STEP':>10}  {'CREATED (UTC)':<19}  {'SIZE':>9}  {'KIND':<7}  METRICS")
    for row in rows:
        metrics = " ".join(f"{k}={_num(v)}" for k, v in sorted(row["metrics"].items()))
        created = _utc(row["created_at"])
        lines.append(
            f"{row['step']:>10}  {created:<19}  {_human_bytes(row['bytes']):>9}  "
            f"{row.get('kind', 'full'):<7}  {metrics}"
        )
    lines += [f"leftover (not committed, ignored): {path}" for path in report["leftovers"]]
    lines += [f"corrupt (ignored): {c['path']}: {c['reason']}" for c in report["corrupt"]]
    if "restarts" in report:
        lines.append(
            f"restarts: {report['restarts']} Slurm requeue(s); "
            f"{report.get('resumes', 0)} resume(s) from a checkpoint (metrics.jsonl)"
        )
    lines += [_job_line(job) for job in report.get("jobs", [])]
    return "\n".join(lines)


def _job_line(job: Mapping[str, Any]) -> str:
    extra = f", {job['dependency']}" if job.get("dependency") else ""
    return (
        f"job {job.get('job_id')} ({job.get('kind')}, {job.get('executor')}{extra}): "
        f"{job['state']}, submitted {_utc(float(job.get('submitted_at', 0)))} UTC"
    )


def _num(value: float | None) -> str:
    return "nan" if value is None else f"{value:.6g}"


def _utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# --- verify ------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    target = open_target(args.path, args.overrides)
    if target.exists(MANIFEST_NAME):
        checked = [_verify_checkpoint(target)]
    elif target.exists(CHECKPOINTS_DIR):
        checked = _verify_run(target)
    else:
        raise UsageError(
            f"{target.path()} is neither a run directory (no {CHECKPOINTS_DIR}/) "
            f"nor a checkpoint (no {MANIFEST_NAME})"
        )
    ok = all(c["ok"] for c in checked)
    if args.json:
        print(json.dumps({"ok": ok, "checked": checked}, indent=1))
    else:
        for c in checked:
            print(f"{'ok' if c['ok'] else 'FAILED':<6}  step {c['step']}  {c['path']}")
    for c in checked:
        for problem in c["problems"]:
            print(f"stockpot: {problem}", file=sys.stderr)
    bad = sum(not c["ok"] for c in checked)
    if bad:
        raise CheckpointCorrupt(f"{bad} of {len(checked)} checkpoint(s) failed verification")
    if not args.json:
        print(f"{len(checked)} checkpoint(s) verified (sizes and checksums)")
    return 0


def _verify_checkpoint(ckpt: Store) -> dict[str, Any]:
    from orchestrator.checkpoint import catalog
    from orchestrator.checkpoint.format import parse_step_dirname

    try:
        info = catalog.load_info(ckpt)
    except CheckpointCorrupt as exc:
        return _checked(ckpt.path(), parse_step_dirname(_name_of(ckpt)), [str(exc)])
    return _checked(ckpt.path(), info.step, catalog.verify(ckpt, info.manifest, checksums=True))


def _verify_run(run: Store) -> list[dict[str, Any]]:
    from orchestrator.checkpoint import catalog
    from orchestrator.checkpoint.format import parse_step_dirname

    found = catalog.scan(run)
    checked = []
    total = sum(info.manifest.total_bytes for info in found.committed)
    with _progress_bar("verify", total) as bar:  # bytes checked, on a TTY only
        for info in found.committed:
            problems = catalog.verify(run.child(info.rel), info.manifest, checksums=True)
            checked.append(_checked(run.path(info.rel), info.step, problems))
            bar.update(info.manifest.total_bytes)
    for rel, reason in found.corrupt:  # a manifest that does not parse is a failed checkpoint
        checked.append(
            _checked(run.path(rel), parse_step_dirname(rel.rsplit("/", 1)[-1]), [reason])
        )
    return sorted(checked, key=lambda c: (c["step"] is None, c["step"] or 0))


def _checked(path: str, step: int | None, problems: list[str]) -> dict[str, Any]:
    return {"path": path, "step": step, "ok": not problems, "problems": problems}


# --- export ------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint.export import check_out_name, export_checkpoint

    out = check_out_name(args.out)
    ckpt = _store(args.checkpoint)
    parent, name = _split_out(out)
    with _progress_bar() as bar:
        done = export_checkpoint(
            ckpt, _store(parent), name, prefix=args.prefix, progress=bar.update
        )
    if done.skipped:
        print(f"stockpot: skipped non-tensor entries: {', '.join(done.skipped)}", file=sys.stderr)
    print(f"wrote {out} ({done.tensors} tensors, {_human_bytes(done.nbytes)}) from {ckpt.path()}")
    return 0


def _progress_bar(desc: str = "export", total: int | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not sys.stderr.isatty())


def _split_out(out: str) -> tuple[str, str]:
    parent, _, name = _store(out).url.rpartition("/")  # the store's URL: an absolute path here
    return parent or "/", name
