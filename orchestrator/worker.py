"""One rank's process: `python -m orchestrator.worker CONFIG.json`.

`stockpot run` writes the resolved config as plain JSON and starts one of these per local rank
(or runs `main` in-process when Slurm or torchrun already started the ranks).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator import ending
from orchestrator.config import Config, from_dict
from orchestrator.env import DistEnv
from orchestrator.errors import StockpotError
from orchestrator.logs import LEADER_ONLY, setup_logging
from orchestrator.preemption import catch_early

if TYPE_CHECKING:
    from orchestrator.loop import Outcome
    from orchestrator.storage import Store

# setup_logging: for launch/job.py
__all__ = ["RankEnd", "exit_now", "main", "main_with", "run_rank", "setup_logging", "warm_up"]


@dataclass(frozen=True)
class RankEnd:
    """How one rank's run ended: the code its process leaves with, and either what training
    returned or the one line (already logged) that says why it failed."""

    code: int
    outcome: Outcome | None = None
    failure: str = ""


def run_rank(cfg: Config, env: DistEnv) -> RankEnd:
    """Train this rank (`stockpot run`'s ranks and the submitit job alike), with the built-in
    loop or the config's entrypoint, and record how it ended (orchestrator.ending). A failure
    we can name (our own errors, a peer rank lost) ends as one log line and its exit code;
    anything else keeps its traceback in the log, then the same one line. Set up logging first
    (`setup_logging`)."""
    from orchestrator import entrypoint, runner

    try:
        if cfg.entrypoint is None:
            outcome = runner.train_rank(cfg, env)
        else:
            outcome = entrypoint.run(cfg, env)
    except Exception as exc:  # every failure is classified and recorded
        return _failed(cfg, env, exc)
    if env.is_leader or os.environ.get(ending.END_DIR_VAR):
        klass = ending.FINISHED if outcome.finished else ending.STOPPED
        cause = "finished" if outcome.finished else f"stopped by {outcome.signal or 'a signal'}"
        end = ending.make_end(_life(env), env.rank, klass, cause, world=env.world_size)
        # Every rank finished or stopped alike: the leader's record says it for the run dir.
        ending.record(_run_store(cfg) if env.is_leader else None, os.environ, end)
    if not outcome.finished:
        _leave_together()
    return RankEnd(outcome.exit_code, outcome)


def _leave_together() -> None:
    """A stopped rank exits once every rank is done with its stop (the leader's last metrics
    lines and records): a launcher that ends the job when one rank exits non-zero (torchrun,
    `srun --kill-on-bad-exit`) must not cut the others short, or the job ends killed, not
    stopped, and is not requeued."""
    from orchestrator import dist

    try:
        dist.barrier()
    except Exception as exc:  # a peer gone already: nothing left to wait for
        logging.getLogger("stockpot").warning("ranks did not leave together: %s", exc)


def _failed(cfg: Config, env: DistEnv, exc: Exception) -> RankEnd:
    from orchestrator.dist import lost_peer, one_line

    say = logging.getLogger("stockpot")
    peer = lost_peer(exc) if isinstance(exc, RuntimeError) else None
    if isinstance(exc, StockpotError):
        line, code = str(exc), exc.exit_code
        quiet = getattr(exc, "leader_only", False)  # the same line from every rank: once
        say.error("%s", line, extra=LEADER_ONLY if quiet else None)
    elif peer is not None:  # gloo: a peer rank died, or hung past the collective timeout
        line, code = peer, 1
        say.error("%s", line)
    else:  # the task's or the user's code (or a bug of ours): keep the traceback
        line, code = f"rank {env.rank}: {one_line(exc)}", 1
        say.exception("%s", line)
    life, store = _life(env), _run_store(cfg)
    earlier: list[ending.EndRecord] = []
    try:
        earlier = [e for e in ending.read_ends(store) if e.life != life] if store else []
    except Exception as problem:  # the store may be what failed
        say.warning("could not read earlier lives' records: %s", problem)
    klass = ending.classify(exc, ending.current_step(), earlier, lost_peer=peer is not None)
    if klass == ending.DETERMINISTIC and code == 1:
        say.error("rank %d: the same failure ended an earlier life at this step: deterministic, "
                  "not restarting", env.rank)  # fmt: skip
    own = None if peer is not None else exc
    end = ending.make_end(life, env.rank, klass, line, own, world=env.world_size)
    ending.record(store, os.environ, end)
    return RankEnd(code, failure=line)


def _life(env: DistEnv) -> str:
    return ending.life_id(os.environ, env.job_id, env.restart_count)


def _run_store(cfg: Config) -> Store | None:
    """run.dir for this rank's end record; None if it cannot even be opened (the store may be
    what failed): the supervisor still gets the class word."""
    try:
        from orchestrator.session import run_dir_store

        return run_dir_store(cfg)
    except Exception as exc:
        logging.getLogger("stockpot").warning("could not open run.dir to record the end: %s", exc)
        return None


def main_with(cfg: Config, environ: dict[str, str] | None = None) -> int:
    env = DistEnv.from_environ(os.environ if environ is None else environ)
    setup_logging(env.rank)
    return run_rank(cfg, env).code


def main(argv: list[str] | None = None) -> int:
    (path,) = argv if argv is not None else sys.argv[1:]
    with open(path) as f:
        cfg = from_dict(json.load(f))
    return main_with(cfg)


def warm_up() -> None:
    """What a rank imports before its first step, imported ahead by a standby process
    (orchestrator.standby): ~1.3 s of a start on 2 cores. torch._dynamo is DDP's (its
    constructor imports it, ~0.5 s of the build)."""
    import torch._dynamo
    import torch.nn.parallel  # noqa: F401

    from orchestrator import runner  # noqa: F401


def exit_now(code: int) -> None:
    """Leave without interpreter finalisation. Everything durable is committed by now; what is
    left is C++ teardown of gloo/DDP objects, which can deadlock (a DDP Reducer freed with the
    GIL held while gloo's thread waits for it) or abort ("terminate called without an active
    exception", exit 134) after a clean finish."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    catch_early()
    exit_now(main())
