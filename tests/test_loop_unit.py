"""Pure decisions of the training loop (no process group: world size 1)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.cadence import StopChecks
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import MANUAL, Checkpointer
from orchestrator.config.checkpoint import CheckpointConfig
from orchestrator.loop import _duration
from orchestrator.progress import Progress
from orchestrator.storage import Store


def every(**rule: float) -> CheckpointConfig:
    """A config whose only save rule is `rule` (the section's default saves every 50 steps)."""
    return dataclasses.replace(MANUAL, **rule)


@pytest.mark.parametrize(
    ("schedule", "step", "epoch_ended", "epoch", "minutes_later", "due"),
    [
        (CheckpointConfig(), 100, False, 0, 0, True),  # the default: every 50 steps
        (CheckpointConfig(), 101, False, 0, 0, False),
        (MANUAL, 100, False, 0, 0, False),
        (every(every_epochs=2), 7, True, 4, 0, True),
        (every(every_epochs=2), 7, True, 3, 0, False),
        (every(every_epochs=2), 7, False, 4, 0, False),
        (every(every_minutes=5), 7, False, 0, 6, True),
        (every(every_minutes=5), 7, False, 0, 4, False),
    ],
)
def test_maybe_save_follows_the_schedule(
    tmp_path: Path,
    schedule: CheckpointConfig,
    step: int,
    epoch_ended: bool,
    epoch: int,
    minutes_later: float,
    due: bool,
) -> None:
    now = [1000.0]
    ckpt = Checkpointer(Store(str(tmp_path)), config=schedule, clock=lambda: now[0])
    ckpt.register("counter", save=lambda: {"n": step}, load=lambda state: None)
    now[0] += 60 * minutes_later
    assert ckpt.maybe_save(step, {"loss": 0.5}, epoch_ended=epoch_ended, epoch=epoch) is due
    ckpt.close()
    committed = catalog.scan(Store(str(tmp_path))).committed
    assert [c.step for c in committed] == ([step] if due else [])


def test_the_time_rule_counts_from_the_last_save(tmp_path: Path) -> None:
    now = [0.0]
    ckpt = Checkpointer(Store(str(tmp_path)), config=every(every_minutes=5), clock=lambda: now[0])
    ckpt.register("counter", save=dict, load=lambda state: None)
    now[0] = 301.0
    assert ckpt.maybe_save(1)
    now[0] = 500.0
    assert not ckpt.maybe_save(2), "200 s after the last save, not after the start"
    now[0] = 602.0
    assert ckpt.maybe_save(3)


def test_save_final_saves_once_and_flushes_first(tmp_path: Path) -> None:
    events: list[str] = []
    ckpt = Checkpointer(
        Store(str(tmp_path)),
        config=every(every_steps=2),
        before_save=lambda: events.append("flush"),
    )
    ckpt.register("counter", save=lambda: events.append("state") or {}, load=lambda s: None)
    ckpt.maybe_save(2)
    ckpt.save_final(2)  # already saved by the schedule: nothing new
    ckpt.save_final(3)
    ckpt.close()
    assert events == ["flush", "state", "flush", "state"]
    assert [c.step for c in catalog.scan(Store(str(tmp_path))).committed] == [2, 3]


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


def test_fast_steps_are_checked_every_few_and_a_stop_waits_for_the_next_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = [0.0]
    monkeypatch.setattr("orchestrator.cadence.time.perf_counter", lambda: t[0])
    checks = StopChecks(0)
    checked = []
    stopped = None
    for step in range(200):
        t[0] += 0.01  # 10 ms steps: CHECK_S / 10 ms = 10 steps between checks
        posted = checks.post(step, requested=step >= 57)
        if posted:
            checked.append(step)
        if checks.answer(step + 1):
            stopped = step + 1
            break
    assert checked[:3] == [0, 1, 11]  # every step until the step time is known, then every 10
    assert all(b - a == 10 for a, b in itertools.pairwise(checked[1:]))
    assert stopped == 62  # the stop seen before step 57 ends the run after the next check


def test_slow_steps_are_checked_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    t = [0.0]
    monkeypatch.setattr("orchestrator.cadence.time.perf_counter", lambda: t[0])
    checks = StopChecks(100)  # a resumed run
    checked = []
    for step in range(100, 110):
        t[0] += 0.2
        if checks.post(step, requested=False):
            checked.append(step)
        assert not checks.answer(step + 1)
    assert checked == list(range(100, 110))


def test_a_loop_that_checks_after_its_steps_never_misses_a_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`check` (hand-written loops: one call after each step) keeps the cadence of `post` and
    `answer`: about every CHECK_S of training, agreed after the step."""
    t = [0.0]
    monkeypatch.setattr("orchestrator.cadence.time.perf_counter", lambda: t[0])
    checks = StopChecks(0)
    checked, stopped = [], None
    for step in range(1, 200):
        t[0] += 0.01
        if step >= checks.next:
            checked.append(step)
        if checks.check(step, requested=step >= 57):
            stopped = step
            break
    assert checked[:3] == [1, 11, 21]  # the first step's time sets the cadence at once
    assert all(b - a == 10 for a, b in itertools.pairwise(checked))
    assert stopped == 61  # requested from step 57: agreed at the next checked step


def test_evaluate_puts_the_model_back_in_training_mode() -> None:
    """The loop sets train() once, not every step: evaluate() must leave dropout and batch norm
    as it found them (its eval() is undone), with a real task, model and data."""
    import torch

    from orchestrator.loop import evaluate
    from orchestrator.tasks.synthetic import SyntheticClassification

    task = SyntheticClassification(n_train=64, n_eval=32)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), task.build_model())
    model.train()
    recorded: list[dict[str, float]] = []
    run = SimpleNamespace(
        model=model, task=task, eval_data=task.eval_set(), device="cpu",
        env=SimpleNamespace(rank=0, world_size=1), progress=Progress(),
        metrics=SimpleNamespace(record=lambda step, m: recorded.append(m)),
    )  # fmt: skip
    metrics = evaluate(run, batch_size=8)  # type: ignore[arg-type]
    assert model.training and all(m.training for m in model.modules())
    assert recorded == [metrics] and 0.0 <= metrics["eval/accuracy"] <= 1.0
