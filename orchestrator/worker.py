"""One rank's process: `python -m orchestrator.worker CONFIG.json`.

`stockpot run` writes the resolved config as plain JSON and starts one of these per local rank
(or runs `main` in-process when Slurm or torchrun already started the ranks).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from orchestrator.config import Config, from_dict
from orchestrator.env import DistEnv
from orchestrator.errors import StockpotError
from orchestrator.logs import LEADER_ONLY, setup_logging
from orchestrator.preemption import catch_early

__all__ = ["exit_now", "main", "main_with", "setup_logging"]  # setup_logging: for launch/job.py


def main_with(cfg: Config, environ: dict[str, str] | None = None) -> int:
    from orchestrator import runner

    env = DistEnv.from_environ(os.environ if environ is None else environ)
    setup_logging(env.rank)
    try:
        return runner.exit_code(runner.run(cfg, env))
    except StockpotError as exc:
        quiet = getattr(exc, "leader_only", False)  # the same line from every rank: once
        logging.getLogger("stockpot").error("%s", exc, extra=LEADER_ONLY if quiet else None)
        return exc.exit_code
    except RuntimeError as exc:  # gloo: a peer rank died, or hung past the collective timeout
        from orchestrator.dist import lost_peer

        why = lost_peer(exc)
        if why is None:
            raise
        logging.getLogger("stockpot").error("%s", why)
        return 1


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
