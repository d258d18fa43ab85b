"""The user's own evaluation: soups of `.safetensors` files, or of runs whose task stockpot
cannot build (or should not use), scored by a command or a Python hook instead of the task.

    --eval CMD            a shell command; the candidate model is written to a temporary
                          .safetensors file whose path replaces `{model}` in CMD (shell-quoted)
                          and is in the env as STOCKPOT_SOUP_MODEL; the last stdout line is a
                          JSON object of metrics, e.g. {"eval/accuracy": 0.91}
    --eval-hook MOD:FN    a Python callable given the state dict (name -> tensor), returning a
                          dict of metrics

`UserJudge` has the interface greedy and the final scoring use (`score`, `metric`, `mode`,
`value`, `better_or_equal`, `has_test`); it replaces the task's `Judge`. `learned` and
`--recompute-bn` run the task's model itself, so they are refused with a user evaluation
(config validation, orchestrator/config/soup.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError
from orchestrator.metric_rules import metric_mode

if TYPE_CHECKING:
    import torch

    from orchestrator.config import SoupConfig

log = logging.getLogger(__name__)

State = dict[str, "torch.Tensor"]
MODEL_ENV = "STOCKPOT_SOUP_MODEL"
PLACEHOLDER = "{model}"
TAIL_LINES = 20  # of the command's stdout and stderr, logged when it fails


def wanted(cfg: SoupConfig) -> bool:
    return bool(cfg.eval_cmd or cfg.eval_hook)


class UserJudge:
    """Scores candidate soups with the user's command or hook; `how` says which (SOUP.json's
    `evaluation`, and the key under which a sibling soup's ingredient scores are reused).

    The metric is `--metric`, else `eval/loss` when the evaluation reports it, else the one
    metric it reports, known after the first score (greedy ranks only after that); several
    and no `--metric` is an error only where something ranks by it (`value`)."""

    has_test = False

    def __init__(self, scorer: Callable[[State], dict[str, float]], how: dict[str, str],
                 metric: str | None, mode: str | None) -> None:  # fmt: skip
        self.scorer, self.how = scorer, how
        self._metric, self._mode = metric, mode

    @property
    def metric(self) -> str:
        return self._metric or "eval/loss"

    @property
    def mode(self) -> str:
        return metric_mode(self.metric, self._mode)

    def score(self, state: Mapping[str, torch.Tensor], split: str = "eval",
              batches: int | None = None) -> dict[str, float]:  # fmt: skip
        """The evaluation's metrics of `state` (one split only: `split`/`batches` are the
        task Judge's and do not apply)."""
        t0 = time.perf_counter()
        scores = self.scorer(dict(state))
        if self._metric is None:
            self._metric = _default_metric(scores)
        log.info("soup eval: %s (%.1f s)", _fmt(scores), time.perf_counter() - t0)
        return scores

    def value(self, scores: Mapping[str, float]) -> float:
        if self._metric is None:
            raise UsageError(
                f"{self.describe()} reports {', '.join(sorted(scores))}: say which one ranks "
                "soups with --metric"
            )
        if self.metric not in scores:
            evaluation = self.describe()
            raise UsageError(
                f"--metric {self.metric}: {evaluation} reports {', '.join(sorted(scores))}"
            )
        return scores[self.metric]

    def better_or_equal(self, a: float, b: float) -> bool:
        return a <= b if self.mode == "min" else a >= b

    def describe(self) -> str:
        kind, what = next(iter(self.how.items()))
        return f"--eval {what!r}" if kind == "command" else f"--eval-hook {what}"

    def record(self) -> dict[str, str]:
        """SOUP.json's `evaluation`: how the scores were made, and the metric that ranks."""
        if self._metric is None:
            return dict(self.how)
        return {**self.how, "metric": self.metric, "mode": self.mode}


def build(cfg: SoupConfig) -> UserJudge:
    if cfg.eval_cmd:
        cmd = cfg.eval_cmd
        return UserJudge(lambda s: run_command(cmd, s), {"command": cmd}, cfg.metric, cfg.mode)
    assert cfg.eval_hook
    hook = load_hook(cfg.eval_hook)
    spec = cfg.eval_hook
    return UserJudge(lambda s: call_hook(hook, spec, s), {"hook": spec}, cfg.metric, cfg.mode)


# --- the command -------------------------------------------------------------------------------


def run_command(cmd: str, state: State) -> dict[str, float]:
    """Write `state` to a temporary .safetensors file, run `cmd` on it, parse its last line."""
    fd, path = tempfile.mkstemp(prefix="stockpot-soup-eval-", suffix=".safetensors")
    os.close(fd)
    try:
        _save(state, path)
        line = cmd.replace(PLACEHOLDER, shlex.quote(path))
        # The process's own environment (never logged), plus where the model is.
        env = {**os.environ, MODEL_ENV: path}
        done = subprocess.run(line, shell=True, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=False)  # fmt: skip
    finally:
        os.unlink(path)
    for text in done.stderr.splitlines()[-TAIL_LINES:]:
        log.debug("eval stderr: %s", text)
    scores = _parse(done.stdout) if done.returncode == 0 else None
    if scores is None:
        _log_tail(cmd, done)
        last = next((t for t in reversed(done.stderr.splitlines()) if t.strip()), "")
        status = f"exit code {done.returncode}" if done.returncode else "exit code 0"
        if not done.returncode:
            status += " but its last stdout line is not a JSON object of numbers"
        stderr = last.strip() or "(none)"
        raise UsageError(
            f"--eval {cmd!r} failed: {status}; last stderr line: {stderr}; nothing was committed"
        )
    return scores


def _save(state: State, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def _parse(stdout: str) -> dict[str, float] | None:
    last = next((t for t in reversed(stdout.splitlines()) if t.strip()), "")
    try:
        got = json.loads(last)
    except ValueError:
        return None
    return _numbers(got)


def _numbers(got: Any) -> dict[str, float] | None:
    """A non-empty mapping of names to numbers, as floats; None if it is anything else."""
    if not isinstance(got, Mapping) or not got:
        return None
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in got.values())
    if not ok or not all(isinstance(k, str) for k in got):
        return None
    return {k: float(v) for k, v in got.items()}


def _log_tail(cmd: str, done: subprocess.CompletedProcess[str]) -> None:
    log.error("--eval %r exited %d; its output follows", cmd, done.returncode)
    for name, text in (("stdout", done.stdout), ("stderr", done.stderr)):
        for line in text.splitlines()[-TAIL_LINES:]:
            log.error("eval %s: %s", name, line)


# --- the hook ----------------------------------------------------------------------------------


def load_hook(spec: str) -> Callable[[State], Any]:
    """`pkg.module:function`, imported now so a typo fails before anything is read."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--eval-hook {spec}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"--eval-hook {spec}: {module_name} has no function {attr}")
    return fn


def call_hook(hook: Callable[[State], Any], spec: str, state: State) -> dict[str, float]:
    try:
        got = hook(state)
    except Exception as exc:
        log.error("--eval-hook %s raised", spec, exc_info=True)
        raise UsageError(
            f"--eval-hook {spec} raised {type(exc).__name__}: {exc}; nothing was committed"
        ) from exc
    scores = _numbers(got)
    if scores is None:
        raise UsageError(
            f"--eval-hook {spec} returned {type(got).__name__}, not a dict of metric names to "
            "numbers; nothing was committed"
        )
    return scores


# --- helpers -----------------------------------------------------------------------------------


def _default_metric(scores: Mapping[str, float]) -> str | None:
    """`eval/loss` if reported, else the only metric; None when that is ambiguous."""
    if "eval/loss" in scores:
        return "eval/loss"
    return next(iter(scores)) if len(scores) == 1 else None


def _fmt(scores: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if math.isfinite(v) else f"{k}={v}" for k, v in scores.items())
