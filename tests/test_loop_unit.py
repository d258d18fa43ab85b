"""Pure decisions of the training loop (no process group: world size 1)."""

from __future__ import annotations

import math
import time

import pytest

from orchestrator.config import CheckpointConfig
from orchestrator.loop import _duration, _save_due
from orchestrator.progress import Progress


@pytest.mark.parametrize(
    ("cfg", "step", "epoch_ended", "epoch", "minutes_ago", "due"),
    [
        (CheckpointConfig(every_steps=50), 100, False, 0, 0, True),
        (CheckpointConfig(every_steps=50), 101, False, 0, 0, False),
        (CheckpointConfig(every_steps=None), 100, False, 0, 0, False),
        (CheckpointConfig(every_steps=None, every_epochs=2), 7, True, 4, 0, True),
        (CheckpointConfig(every_steps=None, every_epochs=2), 7, True, 3, 0, False),
        (CheckpointConfig(every_steps=None, every_epochs=2), 7, False, 4, 0, False),
        (CheckpointConfig(every_steps=None, every_minutes=5), 7, False, 0, 6, True),
        (CheckpointConfig(every_steps=None, every_minutes=5), 7, False, 0, 4, False),
    ],
)
def test_save_due(
    cfg: CheckpointConfig, step: int, epoch_ended: bool, epoch: int, minutes_ago: float, due: bool
) -> None:
    last_save = time.monotonic() - 60 * minutes_ago
    assert _save_due(cfg, step, epoch_ended, epoch, last_save) is due


def test_duration_formats_eta() -> None:
    assert (_duration(5), _duration(65), _duration(math.inf)) == ("5s", "1m05s", "?")


def test_progress_round_trips_and_picks_best() -> None:
    p = Progress(step=7, horizon=100, config={"optim.lr": 0.1}, resumes=2)
    p.history = [{"step": 5, "eval/loss": 0.5}, {"step": 7, "eval/loss": 0.4}]
    q = Progress()
    q.load_state_dict(p.state_dict())
    assert q == p
    assert q.best("eval/loss")["step"] == 7 and q.best("eval/loss", "max")["step"] == 5
    assert q.best("eval/accuracy") is None
