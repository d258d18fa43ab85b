"""Restarts inside the allocation: start every rank again after a transient failure.

`stockpot run` (`supervise_local`) and the Slurm batch script (launch/templates/supervise.sh,
embedded by launch/executor.py) follow the same rule, from orchestrator/ending.py's classes:

- finished: done. stopped (a signal, saved): done here; under Slurm, requeue.
- deterministic: stop at once, with the rank's one-line cause already logged.
- transient: start every rank again from the newest commit, at most `launcher.max_restarts`
  times per allocation (under Slurm, then requeue, at most `launcher.max_requeues` times).

A stop asked of the supervisor itself (Ctrl-C, SIGTERM, USR2 to `stockpot run`) is never
answered with a restart, whatever the ranks did.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

from launch import standby
from launch.local import Life, run_life
from orchestrator import ending
from orchestrator.config import Config
from orchestrator.errors import ConfigError

log = logging.getLogger("stockpot.supervise")

# Under Slurm, ranks still running this long after the first one ended are killed (srun
# --wait): a hung rank once its peers gave up on it. At a normal end all leave within a second.
STEP_WAIT_S = 60

# Called for each rank that a signal killed (rank, why): the caller records it in the run dir.
OnKilled = Callable[[str, int, str], None]


def supervise_local(
    argv: list[str],
    nproc: int,
    *,
    max_restarts: int,
    env: Mapping[str, str] | None = None,
    grace_s: float = 10.0,
    on_killed: OnKilled | None = None,
    standby_after_s: float | None = None,
) -> int:
    """Run the ranks here, restarting them after a transient failure; the job's exit code.
    With `standby_after_s` (launcher.standby_after_s), restarts take warm standby ranks
    (launch/standby.py), which are killed unused whenever the run ends instead."""
    spare = None
    if standby_after_s is not None and max_restarts > 0 and standby.fits(argv):
        spare = standby.Standby(argv, nproc, {**os.environ, **(env or {})}, standby_after_s)
    try:
        return _supervise(argv, nproc, max_restarts, env, grace_s, on_killed, spare)
    finally:
        if spare is not None:
            spare.discard()


def _supervise(
    argv: list[str],
    nproc: int,
    max_restarts: int,
    env: Mapping[str, str] | None,
    grace_s: float,
    on_killed: OnKilled | None,
    spare: standby.Standby | None,
) -> int:
    stamp = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="stockpot-ends-") as ends:
        restarts = 0
        while True:
            life = f"{stamp}-{restarts}"
            end_dir = os.path.join(ends, str(restarts))
            os.mkdir(end_dir)
            extra = {**(env or {}), ending.LIFE_ID_VAR: life, ending.END_DIR_VAR: end_dir}
            started = time.monotonic()
            if spare is not None:  # the last life allowed has no use for standbys
                spare.expect(end_dir if restarts < max_restarts else "")
            result = run_life(argv, nproc, env=extra, grace_s=grace_s, standby=spare)
            # A deterministic failure was said by its rank, on this terminal: one line, no echo.
            klass = ending.life_class(ending.read_words(end_dir), nproc)
            killed = _killed(result)
            for rank, why in killed.items():
                log.error("rank %d %s", rank, why)
                if on_killed is not None:
                    on_killed(life, rank, why)
            if klass != ending.TRANSIENT:
                return result.code
            if result.forwarded:
                names = ", ".join(sorted({signal.Signals(s).name for s in result.forwarded}))
                log.error("not restarting: asked to stop (%s) while the ranks ran", names)
                return result.code
            if restarts >= max_restarts:
                log.error(
                    "not restarting: %d restart(s) done, launcher.max_restarts=%d; run again "
                    "to resume from the newest commit",
                    restarts,
                    max_restarts,
                )
                return result.code
            restarts += 1
            log.warning(
                "transient failure after %.1f s (exit %d): starting every rank again from the "
                "newest commit (restart %d of at most launcher.max_restarts=%d)",
                time.monotonic() - started,
                result.code,
                restarts,
                max_restarts,
            )


def _killed(life: Life) -> dict[int, str]:
    """Ranks that a signal ended, with why; those we killed ourselves are said apart."""
    out = {}
    for rank, rc in enumerate(life.returncodes):
        if rc is None or rc >= 0:
            continue
        name = signal.Signals(-rc).name
        if rank in life.killed_by_us:
            out[rank] = f"did not exit after another rank failed: {name} from the spawner"
        else:
            out[rank] = f"was killed by {name}"
    return out


def slurm_supervisor(cfg: Config, folder: str | Path, command: str) -> list[str]:
    """The supervisor's lines for the sbatch script (templates/supervise.sh): `command` is the
    rank's (submitit's job runner), run under srun once per life."""
    if any(c in str(folder) for c in '"$`\\\n'):
        raise ConfigError(
            f"launcher.log_dir {str(folder)!r}: the batch script quotes it in double quotes; "
            'choose a path without ", $, `, \\ or a newline'
        )
    text = resources.files("launch.templates").joinpath("supervise.sh").read_text()
    fills = {
        "@FOLDER@": str(folder),
        "@COMMAND@": command,
        "@MAX_RESTARTS@": str(cfg.launcher.max_restarts),
        "@MAX_REQUEUES@": str(cfg.launcher.max_requeues),
        "@WAIT_S@": str(STEP_WAIT_S),
    }
    for key, value in fills.items():
        text = text.replace(key, value)
    return text.rstrip("\n").split("\n")
