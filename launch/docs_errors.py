"""docs/troubleshooting.md: a short guide to what goes wrong most, then every error message the
CLI can print (`stockpot: error: ...`), found by reading the source, with its exit code and fix.

The catalogue is built from the AST of orchestrator/ and launch/: each `raise X(message)` and
`require(ok, message, error=X)` whose X is one of stockpot's errors (orchestrator/errors.py).
Placeholders of f-strings show as `<name>`. Each entry's fix is the specific one in FIXES when
a key of it occurs in the message, else the fix for its kind of error.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("orchestrator", "launch")

# Exit code and the fix that fits every error of the kind (orchestrator/errors.py).
KINDS: dict[str, tuple[int, str]] = {
    "ConfigError": (
        2,
        "Fix the named key in the YAML or the `key=value` override; `stockpot run CONFIG "
        "--print-config` shows what the config resolves to. Every key: [config.md](config.md).",
    ),
    "UsageError": (2, "Point the command at what it names (a run dir, a checkpoint, a file)."),
    "CheckpointCorrupt": (
        3,
        "`stockpot verify RUN` names the bad file. Delete that checkpoint's directory (it is "
        "ignored anyway) or restore it from a copy; resume falls back to the newest checkpoint "
        "that verifies.",
    ),
    "CheckpointError": (
        1,
        "The save did not commit; the previous checkpoint is intact. Check free space and write "
        "access of run.dir (for S3: credentials, bucket, endpoint), then run again to resume.",
    ),
    "StorageError": (
        1,
        "Check the path or bucket, permissions and credentials (AWS_* variables, ~/.aws); "
        "transient S3 errors were already retried `storage.s3.max_attempts` times.",
    ),
    "StockpotError": (1, "Read the message; `stockpot --debug ...` shows the traceback."),
}

# Specific fixes, keyed by a phrase of the message they apply to.
FIXES: dict[str, str] = {
    "unknown config key": "Check the spelling against the valid keys the message lists.",
    "config changed since checkpoint": "Resume with the config the run started with, or "
    "`resume.allow_config_change=true` if the change is intended, or a new `run.dir`.",
    "is not a run directory": "Give the run dir (the one that holds `checkpoints/`), or the "
    "run's YAML config so its `run.dir` and `storage` settings are used.",
    "no storage backend": "Use a local path or a URL of a scheme the message lists (a new "
    "backend is a module of orchestrator/storage/ and its entry in storage/registry.py).",
    "does not exist": "Check the path; for `s3://` URLs also the endpoint and credentials.",
    "model.init_from": "`model.init_from` must come from the same architecture: match the "
    "model's config to the checkpoint's, or start without init_from.",
    "not committed": "See CheckpointError below; the previous commit is intact.",
    "failed (rank": "A rank's DCP read or write failed, as the message says. Loading: the "
    "registered state does not fit the checkpoint (a model or optimizer changed since it was "
    "saved; resume with the config it was saved with). Writing: check free space and write "
    "access of run.dir.",
    "task._target_": "The import path must name a class or function importable from the "
    "directory `stockpot run` starts in (`stockpot init NAME` makes one that is).",
    "overrides": "key=value overrides apply to a config: pass the YAML config, not a dir.",
}

GUIDE = """\
# Troubleshooting

Every error stockpot raises on purpose prints one line, `stockpot: error: <message>` (from a
training rank: its log line `[rank N] ERROR stockpot: <message>`), and exits with the code below
(2: bad config or usage, 3: a corrupt checkpoint, 1: anything else);
`stockpot --debug <command> ...` shows the traceback. Most messages already say how to fix
them; the catalogue below lists each one with its fix.

## The run does not resume where I expected

- `stockpot status RUN` lists the committed checkpoints; only a checkpoint with its
  `MANIFEST.json` counts. Directories without one are leftovers of a save a kill cut short:
  ignored, and collected by the next save.
- A resume that fails to verify the newest checkpoint falls back to the previous one and says so
  in the log. `stockpot verify RUN` checks every checkpoint (exit 3 names the bad file). When
  no committed checkpoint verifies, the run stops (exit 3) instead of starting over: a storage
  that misread them once would otherwise see them deleted by the new run's retention.
- Exit 75 means the run stopped on a signal after saving: run the same command again.

## A resumed run's curves show steps twice

Read `metrics.jsonl` by the LAST line per step (a resumed run repeats the steps after its
checkpoint). TensorBoard (`<run.dir>/tb/`) already hides them: each life opens its writer with
`purge_step`, so `tensorboard --logdir RUN/tb` shows each step once with restarts marked
(`events/resumes`). `stockpot plot RUN` draws the same view as a PNG.

## Slurm requeues, preemptions and time-outs

See [slurm.md](slurm.md): the job must be submitted with `--requeue`, the signal must reach the
ranks (`launcher.signal_delay_s`), and time-outs count against `launcher.max_requeues`.
`stockpot status RUN` splits resumes into preemptions, time-outs and crashes.

## S3

Credentials come only from the AWS environment or files, never the config. A 403 or 404 is not
retried; 5xx, throttling and connection resets are. Details: [s3.md](s3.md).

## Other failures

- `stockpot: error: [Errno ...]` (exit 1): a local path is missing or not writable.
- A rank that dies (out of memory, a bug in the task) ends the job with its exit code; the
  checkpoint before it is intact. Run again to resume once fixed.
"""


@dataclass(frozen=True)
class ErrorSite:
    kind: str  # the exception class
    message: str  # the message with `<name>` placeholders
    where: str  # the file (no line number: the page must not go stale on every edit)


def find_errors(root: Path = ROOT) -> list[ErrorSite]:
    sites: list[ErrorSite] = []
    for package in SOURCES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            rel = path.relative_to(root).as_posix()
            for node in ast.walk(tree):
                site = _site(node, rel)
                if site is not None:
                    sites.append(site)
    return sorted(set(sites), key=lambda s: (s.kind, s.message, s.where))


def _site(node: ast.AST, rel: str) -> ErrorSite | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return None
    name = node.func.id
    if name in KINDS and node.args:
        message = node.args[0]
    elif name == "require" and len(node.args) >= 2:
        message = node.args[1]
        chosen = node.args[2] if len(node.args) > 2 else None
        chosen = next((k.value for k in node.keywords if k.arg == "error"), chosen)
        name = chosen.id if isinstance(chosen, ast.Name) else "ConfigError"
    else:
        return None
    text = _template(message)
    if name not in KINDS or text is None:
        return None
    return ErrorSite(name, text, rel)


def _template(node: ast.AST) -> str | None:
    """The message with placeholders as `<name>`; None when it is not built from literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_template(v) or "" for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return f"<{_placeholder(node.value)}>"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        return None if left is None or right is None else left + right
    return None


def _placeholder(expr: ast.AST) -> str:
    if isinstance(expr, ast.Attribute):
        return expr.attr
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        return _placeholder(expr.func.value)
    return "..."


def troubleshooting() -> str:
    lines = [GUIDE, "## Every error message", ""]
    lines.append(
        "<!-- generated by `python -m launch.docs` from the source: do not edit by hand -->"
    )
    lines.append("")
    sites = find_errors()
    for kind in KINDS:
        mine = [s for s in sites if s.kind == kind]
        if not mine:
            continue
        code, general = KINDS[kind]
        lines += [
            f"### {kind} (exit {code})",
            "",
            f"Fix, unless a line says otherwise: {general}",
            "",
        ]
        for site in mine:
            specific = [fix for phrase, fix in FIXES.items() if phrase in site.message]
            fix = f" Fix: {' '.join(specific)}" if specific else ""
            lines.append(f"- `{_md(site.message)}` ({site.where}).{fix}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _md(text: str) -> str:
    return " ".join(text.replace("`", "'").split())
