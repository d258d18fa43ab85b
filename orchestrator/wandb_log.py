"""Optional Weights & Biases logging (`logging.wandb: true`), a sink of the metrics log.

The W&B run id is kept in `<run.dir>/wandb_id`, so every life of a run (each resume, each
Slurm requeue) continues the same W&B run instead of starting a new one. W&B does not take a
step lower than one it already has: after a resume the steps trained again keep the killed
life's values there (TensorBoard and `stockpot plot` show the re-trained ones). Not tested
against the service; wandb is imported only when this is on.
"""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.storage import Store

log = logging.getLogger(__name__)

ID_NAME = "wandb_id"


class WandbWriter:
    def __init__(self, run: Store, project: str, name: str) -> None:
        import wandb

        try:
            run_id = run.read_bytes(ID_NAME).decode().strip()
        except FileNotFoundError:
            run_id = wandb.util.generate_id()
            run.write_bytes(ID_NAME, run_id.encode())
        self._run: Any = wandb.init(project=project, name=name, id=run_id, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self._run.log({tag: text}, step=step)

    def flush(self) -> None:
        """W&B streams in its own process; nothing to flush here."""

    def close(self) -> None:
        self._run.finish()


def open_wandb(run: Store, project: str | None, name: str) -> WandbWriter | None:
    """The leader's W&B sink, or None when off or when wandb is not installed (said once)."""
    if project is None:
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        log.warning(
            "logging.wandb: the wandb package is not installed (pip install wandb); skipping"
        )
        return None
    return WandbWriter(run, project, name)
