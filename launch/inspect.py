"""The CLI's read-only commands: `stockpot status`, `stockpot verify`, `stockpot export`.

`status` also shows what `stockpot submit` recorded (jobs.json, with each job's state from
`squeue` when Slurm is reachable) and the restart count from metrics.jsonl.

None of them needs a process group or the model's code: they read manifests, and `export` reads
tensors one bounded batch at a time through DCP's metadata. Heavy modules (torch, fsspec) are
imported inside the commands so `stockpot --help` stays fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.checkpoint.layout import CHECKPOINTS_DIR, MANIFEST_NAME  # re only: light
from orchestrator.errors import CheckpointCorrupt, StockpotError, UsageError

if TYPE_CHECKING:
    from orchestrator.checkpoint.catalog import CheckpointInfo, Scan
    from orchestrator.storage import Store

EXPORT_BATCH_BYTES = 256 << 20  # tensors loaded per DCP read; memory stays ~ one batch
SAFETENSORS_SUFFIX = ".safetensors"
JOBS_NAME = "jobs.json"  # == launch.submit.JOBS_NAME: what `stockpot submit` recorded
SQUEUE_TIMEOUT_S = 10


def _store(url: str) -> Store:
    from orchestrator.storage import Store

    return Store(url)


def _name_of(store: Store) -> str:
    return store.path().rstrip("/").rsplit("/", 1)[-1]


# --- status ------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint import catalog

    run = _run_store(args.run_dir)
    report = status_report(run, catalog.scan(run))
    report.update(activity_report(run))
    print(json.dumps(report, indent=1) if args.json else format_status(run.path(), report))
    return 0


def _run_store(url: str) -> Store:
    run = _store(url)
    if not run.exists(""):
        raise UsageError(f"run directory {run.path()} does not exist")
    if not run.exists(CHECKPOINTS_DIR) and not run.exists(JOBS_NAME):  # submitted, not started
        raise UsageError(f"{run.path()} is not a run directory (it has no {CHECKPOINTS_DIR}/)")
    return run


def activity_report(run: Store) -> dict[str, Any]:
    """`restarts` (Slurm requeues) and `resumes` (from metrics.jsonl), and `jobs` (from jobs.json, with their Slurm state), each
    only when the run has that file."""
    from orchestrator.metrics import read_metrics

    out: dict[str, Any] = {}
    metrics = read_metrics(run)
    if metrics:
        out["restarts"] = max(int(line.get("restart", 0)) for line in metrics)
        out["resumes"] = sum(1 for line in metrics if line.get("event") == "resumed")
    if run.exists(JOBS_NAME):
        from launch.submit import read_jobs

        out["jobs"] = [{**job, "state": job_state(job)} for job in read_jobs(run)]
    return out


def job_state(job: Mapping[str, Any]) -> str:
    """Slurm's state of a recorded job (`squeue -t all`): PENDING, RUNNING, COMPLETED, ...;
    NOT_IN_QUEUE once Slurm has forgotten it (MinJobAge) or for an unknown id; UNKNOWN when
    Slurm cannot be asked from here."""
    job_id = str(job.get("job_id", ""))
    if job.get("executor") == "local":
        return _local_state(job_id)
    if shutil.which("squeue") is None:
        return "UNKNOWN"
    try:
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
            capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    states = sorted(set(out.stdout.split()))
    if out.returncode != 0 or not states:
        return "NOT_IN_QUEUE"
    return ",".join(states)  # an array's elements may differ


def _local_state(pid: str) -> str:
    """A LocalExecutor job id is its controller's pid on the submitting machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return "NOT_RUNNING"
    except PermissionError:
        pass
    return "RUNNING"


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
        lines.append(f"{'STEP':>10}  {'CREATED (UTC)':<19}  {'SIZE':>9}  METRICS")
    for row in rows:
        metrics = " ".join(f"{k}={_num(v)}" for k, v in sorted(row["metrics"].items()))
        created = _utc(row["created_at"])
        lines.append(
            f"{row['step']:>10}  {created:<19}  {_human_bytes(row['bytes']):>9}  {metrics}"
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
    target = _store(args.path)
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
    from orchestrator.checkpoint.layout import parse_step_dirname

    try:
        info = catalog.load_info(ckpt)
    except CheckpointCorrupt as exc:
        return _checked(ckpt.path(), parse_step_dirname(_name_of(ckpt)), [str(exc)])
    return _checked(ckpt.path(), info.step, catalog.verify(ckpt, info.manifest, checksums=True))


def _verify_run(run: Store) -> list[dict[str, Any]]:
    from orchestrator.checkpoint import catalog
    from orchestrator.checkpoint.layout import parse_step_dirname

    found = catalog.scan(run)
    checked = [
        _checked(
            run.path(info.rel),
            info.step,
            catalog.verify(run.child(info.rel), info.manifest, checksums=True),
        )
        for info in found.committed
    ]
    for rel, reason in found.corrupt:  # a manifest that does not parse is a failed checkpoint
        checked.append(
            _checked(run.path(rel), parse_step_dirname(rel.rsplit("/", 1)[-1]), [reason])
        )
    return sorted(checked, key=lambda c: (c["step"] is None, c["step"] or 0))


def _checked(path: str, step: int | None, problems: list[str]) -> dict[str, Any]:
    return {"path": path, "step": step, "ok": not problems, "problems": problems}


# --- export ------------------------------------------------------------------------------

# torch dtype name -> safetensors dtype code (names, so this table needs no torch import).
_DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "complex64": "C64",
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    name: str  # in the safetensors file: the plain parameter name, e.g. `fc.weight`
    key: str  # the flat DCP key, e.g. `train.model.fc.weight`
    dtype: str  # torch dtype name, e.g. `float32`
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def cmd_export(args: argparse.Namespace) -> int:
    out = _check_out(args.out)
    ckpt = _store(args.checkpoint)
    info = _committed(ckpt)
    from orchestrator.checkpoint import catalog, dcp_io

    problems = catalog.verify(ckpt, info.manifest, checksums=False)
    if problems:
        raise CheckpointCorrupt(f"refusing to export {ckpt.path()}: {'; '.join(problems)}")
    data = info.manifest.data_dir  # where DCP's files are, relative to the checkpoint
    tensors = dcp_io.read_metadata(ckpt, data).state_dict_metadata
    from orchestrator.checkpoint.weights import choose_prefix

    prefix = choose_prefix(tensors, args.prefix)
    entries = model_entries(tensors, prefix)
    metadata = {"format": "pt", "step": str(info.step), "source": ckpt.path()}
    header, ordered = safetensors_header(entries, metadata)
    total = _write_safetensors(ckpt, data, out, header, ordered)
    print(f"wrote {out} ({len(ordered)} tensors, {_human_bytes(total)}) from {ckpt.path()}")
    return 0


def _check_out(out: str) -> str:
    name = out.rsplit("/", 1)[-1]
    if name.endswith(SAFETENSORS_SUFFIX) and name != SAFETENSORS_SUFFIX:
        return out
    fixed = out[: len(out) - len(name)] + (name.split(".", 1)[0] or "model") + SAFETENSORS_SUFFIX
    raise UsageError(f"--out must name a {SAFETENSORS_SUFFIX} file, e.g. --out {fixed}")


def _committed(ckpt: Store) -> CheckpointInfo:
    from orchestrator.checkpoint import catalog

    if not ckpt.exists(MANIFEST_NAME):
        hint = (
            f" (a run directory: pass one of its {CHECKPOINTS_DIR}/step-* dirs)"
            if ckpt.exists(CHECKPOINTS_DIR)
            else ""
        )
        raise UsageError(f"{ckpt.path()} is not a committed checkpoint (no {MANIFEST_NAME}){hint}")
    return catalog.load_info(ckpt)


def model_entries(tensors: Mapping[str, Any], prefix: str) -> list[TensorEntry]:
    """The tensors under `prefix`, renamed to plain names; non-tensor items are skipped."""
    entries, skipped = [], []
    for key, meta in tensors.items():
        if not key.startswith(prefix):
            continue
        if not hasattr(meta, "size"):  # BytesStorageMetadata: a pickled object, not a tensor
            skipped.append(key)
            continue
        dtype = str(meta.properties.dtype).removeprefix("torch.")
        if dtype not in _DTYPE_CODES:
            raise StockpotError(f"{key} has dtype {dtype}, which safetensors cannot hold")
        itemsize = meta.properties.dtype.itemsize
        entries.append(TensorEntry(key[len(prefix) :], key, dtype, tuple(meta.size), itemsize))
    if skipped:
        print(
            f"stockpot: skipped non-tensor entries: {', '.join(sorted(skipped))}", file=sys.stderr
        )
    if not entries:
        raise UsageError(f"no tensors under {prefix!r}")
    return entries


def safetensors_header(
    entries: Iterable[TensorEntry], metadata: Mapping[str, str]
) -> tuple[bytes, list[TensorEntry]]:
    """The safetensors header (JSON, space-padded to 8 bytes) and the order the data must follow.

    Like the reference writer: largest item size first, then by name, so with an 8-aligned
    header every tensor starts aligned to its own item size.
    """
    ordered = sorted(entries, key=lambda e: (-e.itemsize, e.name))
    body: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in ordered:
        body[e.name] = {
            "dtype": _DTYPE_CODES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, ordered


def _batches(entries: list[TensorEntry], limit: int) -> Iterator[list[TensorEntry]]:
    batch: list[TensorEntry] = []
    size = 0
    for e in entries:
        if batch and size + e.nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(e)
        size += e.nbytes
    if batch:
        yield batch


def _write_safetensors(
    ckpt: Store, data: str, out: str, header: bytes, entries: list[TensorEntry]
) -> int:
    """Stream the tensors into `out` (a temp file renamed into place; nothing left on error)."""
    from tqdm import tqdm

    if sys.byteorder != "little":  # safetensors is little-endian; raw tensor bytes are native
        raise StockpotError("export needs a little-endian machine")
    parent, name = _split_out(out)
    total = sum(e.nbytes for e in entries)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc="export", disable=not sys.stderr.isatty()
    )
    with bar, _store(parent).open_write(name) as f:
        f.write(header)
        for batch in _batches(entries, EXPORT_BATCH_BYTES):
            loaded = _load_batch(ckpt, data, batch)
            for e in batch:
                f.write(_raw_bytes(loaded.pop(e.key), e))
                bar.update(e.nbytes)
    return total


def _load_batch(ckpt: Store, data: str, batch: list[TensorEntry]) -> dict[str, Any]:
    import pickle

    from torch.distributed.checkpoint.api import CheckpointException

    from orchestrator.checkpoint import dcp_io

    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled": we know, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return dcp_io.load_flat(ckpt, data, [e.key for e in batch])
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, CheckpointException) as exc:
        # Sizes matched but the bytes do not load: the checksums would have caught it.
        # (torch's own message for this suggests weights_only=False: the wrong advice here.)
        cause = (
            next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) else exc
        )
        raise CheckpointCorrupt(
            f"{ckpt.path()}: tensor data does not load ({type(cause).__name__} reading "
            f"{batch[0].key}...); run `stockpot verify {ckpt.path()}` (--debug for details)"
        ) from exc


def _split_out(out: str) -> tuple[str, str]:
    if out.startswith("s3://"):
        parent, _, name = out.rpartition("/")
        return parent, name
    full = os.path.abspath(out)
    return os.path.dirname(full), os.path.basename(full)


def _raw_bytes(tensor: Any, entry: TensorEntry) -> memoryview:
    import torch

    if tuple(tensor.shape) != entry.shape or tensor.dtype.itemsize != entry.itemsize:
        raise CheckpointCorrupt(
            f"{entry.key}: loaded {tuple(tensor.shape)}, metadata says {entry.shape}"
        )
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())
