"""The picklable job submitit runs on every srun task: `TrainingJob` (the chained soup job is
launch/soup_job.py).

They hold plain data only (the config as `Config.to_dict()`), so no DictConfig, torch object or
open file travels in submitit's pickle.

How a preempted or failed job goes on: stockpot's supervisor (launch/supervise.py, the batch
script's last setup lines) runs these tasks as one srun step per life and decides from how the
ranks ended (orchestrator/ending.py): a stop (every rank saved and committed, exit 75) is
requeued by the supervisor with `scontrol requeue`, never by a rank, so a rank in a container
without Slurm's binaries needs none; a transient failure starts every rank again inside the
allocation. submitit installs its own handlers before it calls the job (USR2 ->
`checkpoint_and_try_requeue` on rank 0, which would run `scontrol requeue` from the rank): the
job replaces them at once (`catch_early`), and while training the StopFlag
(orchestrator/preemption.py) sets a flag that every rank acts on at the next step boundary.

Time-out or preemption: a USR2 is called a time-out when the run has lasted at least
min(0.8 x limit, limit - 10 min) (`timeout_threshold_s`, submitit's rule), else a preemption;
the report says which. Every requeue counts against launcher.max_requeues (SLURM_RESTART_COUNT).

Leaving: rank processes must not tear down DDP/gloo objects in-process (orchestrator/runner.py,
`_RETAINED`), so each task leaves through `os._exit` from an atexit hook, which runs after
submitit has written this task's result pickle (or after its requeue's `sys.exit`).

Failing: a failure stockpot can name (its own errors, a lost peer rank) is one log line, as
under `stockpot run` (both run `orchestrator.worker.run_rank`); that line is also the task's
result (`job.result()` raises it on the login side) and the task leaves with its exit code.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.config import Config, from_dict
from orchestrator.env import DistEnv
from orchestrator.logs import LEADER_ONLY

if TYPE_CHECKING:
    from orchestrator.loop import Outcome

log = logging.getLogger("stockpot.job")

# submitit's rule: a signal this close to the limit is a time-out, earlier ones a preemption.
TIMEOUT_FRACTION = 0.8
TIMEOUT_MARGIN_S = 600.0


def timeout_threshold_s(timeout_min: float) -> float:
    """Run time from which submitit counts a signal as a time-out rather than a preemption."""
    limit = 60.0 * timeout_min
    return min(TIMEOUT_FRACTION * limit, limit - TIMEOUT_MARGIN_S)


def counts_as_timeout(elapsed_s: float, timeout_min: float) -> bool:
    return elapsed_s >= timeout_threshold_s(timeout_min)


def _under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_FOLDER"))  # set by submitit's process_job


class _ExitCode:
    """The code the task leaves with; updated as the run goes (1 until something better)."""

    def __init__(self) -> None:
        self.value = 1


def _leave(code: _ExitCode) -> None:
    from orchestrator.worker import exit_now

    exit_now(code.value)  # flushes logs, then os._exit: no torch teardown


class TrainingJob:
    """One rank of the run, as submitit pickles it; `checkpoint()` only asks to be requeued."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = dict(cfg)  # Config.to_dict(): plain data
        self._started = time.time()

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cfg = state["cfg"]
        self._started = time.time()

    def __call__(self) -> dict[str, Any]:
        from orchestrator.preemption import catch_early

        catch_early()  # not submitit's handlers: the supervisor requeues, after every rank saved
        self._started = time.time()
        code = _ExitCode()
        if _under_submitit():
            atexit.register(_leave, code)
        from orchestrator.worker import run_rank, setup_logging

        cfg = from_dict(self.cfg)
        env = DistEnv.from_environ(os.environ)
        setup_logging(env.rank)
        logging.getLogger("submitit").propagate = False  # it has its own handlers
        _forget_previous_result()
        _log_start(cfg, env)
        end = run_rank(cfg, env)
        code.value = end.code
        if end.outcome is None:  # said in one line already: no traceback from submitit
            _record_failure(end.failure)
            raise SystemExit(end.code)
        return self._report(cfg, env, end.outcome)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook (its USR2 handler, replaced once the job starts): requeue,
        at most launcher.max_requeues times."""
        return requeue(
            self,
            from_dict(self.cfg).launcher.max_requeues,
            again="it resumes from its last committed checkpoint",
            stays="the run stays at its last committed checkpoint (submit it again to continue)",
        )

    def _report(self, cfg: Config, env: DistEnv, outcome: Outcome) -> dict[str, Any]:
        elapsed = time.time() - self._started
        kind = ""
        if not outcome.finished:
            timed_out = counts_as_timeout(elapsed, cfg.launcher.timeout_min)
            kind = "time-out" if timed_out else "preemption"
            log.warning(
                "stopped by %s after %.1f min of the %d min limit: submitit counts it as a "
                "%s (time-outs from %.1f min on, at most launcher.max_requeues=%d of them)",
                outcome.signal or "a signal on another rank",
                elapsed / 60,
                cfg.launcher.timeout_min,
                kind,
                timeout_threshold_s(cfg.launcher.timeout_min) / 60,
                cfg.launcher.max_requeues,
                extra=LEADER_ONLY,
            )
        if env.is_leader:
            _warn_slow_save(cfg, outcome)
        return {
            "finished": outcome.finished,
            "step": outcome.step,
            "signal": outcome.signal,
            "stop": kind,
            "save_s": outcome.save_s,
            "restart": env.restart_count,
            "rank": env.rank,
            "job_id": env.job_id,
        }


def requeue(job: Callable[[], Any], max_requeues: int, *, again: str, stays: str) -> Any:
    """What a job's `checkpoint()` returns: `job` again (submitit requeues it) unless this run
    already is the `max_requeues`-th restart (SLURM_RESTART_COUNT), then None. submitit's own
    cap (`max_num_timeout`) counts time-outs only; this counts preemptions too. `again` and
    `stays` say what happens to the job either way."""
    from submitit.helpers import DelayedSubmission

    restarts = DistEnv.from_environ(os.environ).restart_count
    if restarts >= max_requeues:
        log.error(
            "NOT requeuing: this run is restart %d and launcher.max_requeues=%d; %s",
            restarts,
            max_requeues,
            stays,
        )
        return None
    log.warning("requeuing: restart %d of at most %d; %s", restarts + 1, max_requeues, again)
    return DelayedSubmission(job)


def _log_start(cfg: Config, env: DistEnv) -> None:
    log.info(
        "job %s on %s: %d rank(s), restart %d (launcher.max_requeues %d), run.dir %s",
        env.job_id or "-",
        socket.gethostname(),
        env.world_size,
        env.restart_count,
        cfg.launcher.max_requeues,
        cfg.run.dir,
        extra=LEADER_ONLY,
    )


def _forget_previous_result() -> None:
    """Delete this task's result pickle from an earlier run of the job: after a requeue the
    login side would otherwise take that run's 'stopped' result for this one's."""
    if not _under_submitit():
        return
    from submitit import JobEnvironment

    JobEnvironment().paths.result_pickle.unlink(missing_ok=True)


def _record_failure(line: str) -> None:
    """Record the failure as submitit's process_job records a job that raised, with the one
    line in place of a traceback: on the login side, `job.result()` raises it. The job then
    leaves with SystemExit, which process_job lets through without printing anything."""
    if not _under_submitit():
        return
    from submitit import JobEnvironment
    from submitit.core.utils import cloudpickle_dump, temporary_save_path

    with temporary_save_path(JobEnvironment().paths.result_pickle) as tmp:
        cloudpickle_dump(("error", line), tmp)


def _warn_slow_save(cfg: Config, outcome: Outcome) -> None:
    """The job has launcher.signal_delay_s between the time-limit signal and the kill; a save
    slower than that would not commit in time."""
    save_s = outcome.save_s if outcome.save_s is not None else _last_save_s(cfg)
    if save_s is not None and save_s > cfg.launcher.signal_delay_s:
        log.warning(
            "the last save took %.1f s, more than launcher.signal_delay_s=%d: at a time limit "
            "Slurm may kill the job before the save commits; raise launcher.signal_delay_s",
            save_s,
            cfg.launcher.signal_delay_s,
        )


def _last_save_s(cfg: Config) -> float | None:
    from orchestrator.checkpoint import catalog
    from orchestrator.runner import run_dir_store

    latest = catalog.scan(run_dir_store(cfg)).latest()
    return sum(latest.manifest.timings.values()) if latest is not None else None
