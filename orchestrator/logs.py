"""How a rank logs: every line names its rank, and lines about the whole run print once.

A line that says the same thing on every rank (progress, eval results, "resumed from step N")
is marked leader-only at the call, and the filter that `setup_logging` installs drops it on
every rank but the leader:

    log.info("eval at step %d: %s", step, text, extra=LEADER_ONLY)

Lines about this rank (its own failure, its own missing state) stay unmarked.
"""

from __future__ import annotations

import logging

LEADER_ONLY = {"leader_only": True}  # `extra=` of a line that only the leader prints


class LeaderOnly(logging.Filter):
    """Passes every line on the leader; elsewhere drops the lines marked LEADER_ONLY."""

    def __init__(self, is_leader: bool) -> None:
        super().__init__()
        self.is_leader = is_leader

    def filter(self, record: logging.LogRecord) -> bool:
        return self.is_leader or not getattr(record, "leader_only", False)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for handler in logging.getLogger().handlers:  # on the handler: it sees every logger's lines
        handler.addFilter(LeaderOnly(rank == 0))  # the leader is global rank 0 (dist.LEADER)
