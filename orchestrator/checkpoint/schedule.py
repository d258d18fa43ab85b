"""When the Checkpointer saves on its own (`maybe_save`): every N steps, every N epochs, or
every N minutes since the last save; any rule that is set and met is enough."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import dist


@dataclass(frozen=True)
class SaveSchedule:
    """When `maybe_save` saves: whenever any rule that is set is met (none set: never)."""

    every_steps: int | None = None
    every_epochs: int | None = None
    every_minutes: float | None = None

    def due(self, step: int, *, epoch_ended: bool, epoch: int, since_save_s: float) -> bool:
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_epochs = self.every_epochs is not None and epoch_ended and epoch % self.every_epochs == 0
        by_time = self.every_minutes is not None and dist.agree(
            since_save_s >= 60 * self.every_minutes  # clocks differ: any rank decides for all
        )
        return by_steps or by_epochs or by_time
