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

from orchestrator.config import Config, from_dict
from orchestrator.env import DistEnv
from orchestrator.errors import StockpotError
from orchestrator.logs import LEADER_ONLY, setup_logging
from orchestrator.preemption import catch_early

if TYPE_CHECKING:
    from orchestrator.loop import Outcome

# setup_logging: for launch/job.py
__all__ = ["RankEnd", "exit_now", "main", "main_with", "run_rank", "setup_logging"]


@dataclass(frozen=True)
class RankEnd:
    """How one rank's run ended: the code its process leaves with, and either what training
    returned or the one line (already logged) that says why it failed."""

    code: int
    outcome: Outcome | None = None
    failure: str = ""


def run_rank(cfg: Config, env: DistEnv) -> RankEnd:
    """Train this rank (`stockpot run`'s ranks and the submitit job alike), with the built-in
    loop or the config's entrypoint. A failure we can
    name (our own errors, a peer rank lost) ends as one log line and its exit code; anything
    else is a bug and keeps its traceback. Set up logging first (`setup_logging`)."""
    from orchestrator import entrypoint, runner

    try:
        if cfg.entrypoint is None:
            outcome = runner.train_rank(cfg, env)
        else:
            outcome = entrypoint.run(cfg, env)
    except StockpotError as exc:
        quiet = getattr(exc, "leader_only", False)  # the same line from every rank: once
        logging.getLogger("stockpot").error("%s", exc, extra=LEADER_ONLY if quiet else None)
        return RankEnd(exc.exit_code, failure=str(exc))
    except RuntimeError as exc:  # gloo: a peer rank died, or hung past the collective timeout
        from orchestrator.dist import lost_peer

        why = lost_peer(exc)
        if why is None:
            raise
        logging.getLogger("stockpot").error("%s", why)
        return RankEnd(1, failure=why)
    return RankEnd(outcome.exit_code, outcome)


def main_with(cfg: Config, environ: dict[str, str] | None = None) -> int:
    env = DistEnv.from_environ(os.environ if environ is None else environ)
    setup_logging(env.rank)
    return run_rank(cfg, env).code


def main(argv: list[str] | None = None) -> int:
    (path,) = argv if argv is not None else sys.argv[1:]
    with open(path) as f:
        cfg = from_dict(json.load(f))
    return main_with(cfg)


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
