"""When the Checkpointer saves on its own (`maybe_save`): every N steps, every N epochs, or
every N minutes since the last save; any rule that is set and met is enough. The rules are the
config's `SaveSchedule`; deciding needs the ranks to agree on the clock, so it lives here, not
in config (which imports no component)."""

from __future__ import annotations

from orchestrator import dist
from orchestrator.config.checkpoint import SaveSchedule


def due(
    schedule: SaveSchedule, step: int, *, epoch_ended: bool, epoch: int, since_save_s: float
) -> bool:
    """Whether `step` is due for a save; every rank calls it and gets the same answer."""
    by_steps = schedule.every_steps is not None and step % schedule.every_steps == 0
    by_epochs = (
        schedule.every_epochs is not None and epoch_ended and epoch % schedule.every_epochs == 0
    )
    by_time = schedule.every_minutes is not None and dist.agree(
        since_save_s >= 60 * schedule.every_minutes  # clocks differ: any rank decides for all
    )
    return by_steps or by_epochs or by_time
