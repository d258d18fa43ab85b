"""TensorBoard logging: a run killed and resumed looks like one clean run with its restarts marked.

Read back with TensorBoard's own reader (EventAccumulator, which applies `purge_step` the way
the TensorBoard UI does): each step has exactly one value, the one metrics.jsonl's last line for
that step holds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from orchestrator.metrics import MetricsLog, last_per_step, read_metrics
from orchestrator.storage import Store
from orchestrator.tensorboard import TB_DIR
from tests import runs
from tests.fixtures.s3 import s3_storage

MAX_STEPS = 40
EVERY = 4
BASE = [
    "configs/demo.yaml", f"trainer.max_steps={MAX_STEPS}", "trainer.log_every=1",
    "trainer.eval_every=10", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2",
    *runs.SMALL_DATA,
]  # fmt: skip


def scalars(tb_dir: Path | str, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def raw_steps(tb_dir: Path, tag: str) -> list[int]:
    """Every step logged for `tag` in every event file, purged or not (what a naive reader sees)."""
    steps = []
    for path in sorted(tb_dir.iterdir()):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_killed_twice_shows_each_step_once_with_the_last_logged_value(tmp_path: Path) -> None:
    """Both kills land at the unluckiest instant: right after a commit, before the leader's
    next flush, so the killed life never wrote that commit's mark; the life resumed from it
    draws it (and every other commit's mark shows once)."""
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    argv = [*BASE, f"run.dir={run_dir}"]
    at = runs.kill_between_commit_and_flush(argv, run_dir, [8, 20], log=log)
    runs.assert_resumed_from(run_dir, log.read_text(), at)
    tb = run_dir / TB_DIR
    assert len(list(tb.iterdir())) == 3, "one event file per life of the run"
    records = read_metrics(Store(str(run_dir)))
    for tag in ("loss", "lr", "eval/accuracy", "eval/loss"):
        want = last_per_step(records, tag)
        got = scalars(tb, tag)
        steps = [s for s, _ in got]
        assert len(steps) == len(set(steps)), f"{tag}: a step shows twice: {steps}"
        assert dict(got) == pytest.approx(want, rel=1e-6), tag  # TensorBoard keeps float32
    assert [s for s, _ in scalars(tb, "loss")] == list(range(1, MAX_STEPS + 1))
    # Restarts are marked at the step each life resumed from, commits where they committed.
    assert [(s, v) for s, v in scalars(tb, "events/resumes")] == [
        (s, n) for n, s in enumerate(at, 1)
    ]
    commits = [s for s, _ in scalars(tb, "events/commit")]
    assert commits == list(range(EVERY, MAX_STEPS + 1, EVERY)), at
    assert [s for s, _ in scalars(tb, "time/step_s")] == list(range(1, MAX_STEPS + 1))
    # Each life's start-up split, at its first step, in the log and (opened late) TensorBoard.
    starts = [r for r in records if r.get("event") == "startup"]
    assert [r["step"] for r in starts] == [1] + [s + 1 for s in at]
    for r in starts:
        phases = [v for k, v in r.items() if k.startswith("startup/") and k != "startup/total_s"]
        assert len(phases) == 6 and r["startup/total_s"] == pytest.approx(sum(phases), abs=0.01)
    assert [s for s, _ in scalars(tb, "startup/total_s")] == [1] + [s + 1 for s in at]


def _life(run: Store, start: int, resumes: int, steps: range, offset: float) -> None:
    """One life of a run as the leader logs it, flushed as it is before each checkpoint."""
    metrics = MetricsLog(run, enabled=True)
    metrics.start(start, resumes, tensorboard=True)
    for step in steps:
        metrics.record(step, {"loss": offset + step})
    metrics.flush()


def test_resume_purges_the_lost_steps_of_the_earlier_life(tmp_path: Path) -> None:
    run = Store(str(tmp_path / "run"))
    _life(run, 0, 0, range(1, 11), 0.0)  # died at step 10; its newest commit was step 6
    _life(run, 6, 1, range(7, 13), 100.0)
    tb = tmp_path / "run" / TB_DIR
    assert raw_steps(tb, "loss").count(8) == 2, "both lives logged step 8: purge must hide one"
    got = dict(scalars(tb, "loss"))
    assert got == {**{s: float(s) for s in range(1, 7)}, **{s: 100.0 + s for s in range(7, 13)}}
    assert got == last_per_step(read_metrics(run), "loss")
    assert scalars(tb, "events/resumes") == [(6, 1.0)]


@pytest.mark.parametrize("flushed", [False, True])
def test_the_commit_resumed_from_shows_once_whether_its_mark_was_flushed(
    tmp_path: Path, flushed: bool
) -> None:
    """A SIGKILL right after a commit loses the commit's line and mark, which the killed life
    had not flushed yet (here: never recorded); one a moment later (its next flush, or
    TensorBoard's writer thread for the mark) does not. Either way the commit the next life
    resumed from shows once, with the last values of its step."""
    run = Store(str(tmp_path / "run"))
    first = MetricsLog(run, enabled=True)
    first.start(0, 0, tensorboard=True)
    for step in range(1, 9):
        first.record(step, {"loss": float(step)})
    first.flush()  # before the save of step 8 (the checkpointer's before_save)
    if flushed:
        first.commit(8, {"write_s": 0.5})
        first.flush()
    _life(run, 8, 1, range(9, 13), 100.0)
    tb = tmp_path / "run" / TB_DIR
    assert scalars(tb, "events/commit") == [(8, 1.0)]
    assert dict(scalars(tb, "loss")) == last_per_step(read_metrics(run), "loss")
    assert scalars(tb, "checkpoint/write_s") == ([(8, 0.5)] if flushed else [])
    assert scalars(tb, "events/resumes") == [(8, 1.0)]
    records = read_metrics(run)
    assert [r["step"] for r in records if r.get("event") == "commit"] == [8], "and in the log"


@pytest.mark.s3
def test_s3_run_uploads_its_event_files(tmp_path: Path, s3_server, s3_bucket: str) -> None:
    run = Store(f"{s3_bucket}/run", s3_storage(s3_server.endpoint_url))
    _life(run, 0, 0, range(1, 6), 0.0)
    _life(run, 3, 1, range(4, 8), 10.0)
    local = tmp_path / "tb"
    local.mkdir()
    for name in run.list(TB_DIR):
        base = name.rsplit("/", 1)[-1]
        (local / base).write_bytes(run.read_bytes(f"{TB_DIR}/{base}"))
    assert len(list(local.iterdir())) == 2
    assert dict(scalars(local, "loss")) == {1: 1, 2: 2, 3: 3, 4: 14, 5: 15, 6: 16, 7: 17}


def test_wandb_without_the_package_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here (it is not a dependency)")
    run = Store(str(tmp_path / "run"))
    metrics = MetricsLog(run, enabled=True)
    with caplog.at_level("WARNING"):
        metrics.start(0, 0, tensorboard=False, wandb_project="proj")
    assert metrics.sinks == []
    assert "logging.wandb: the wandb package is not installed" in caplog.text
    metrics.record(1, {"loss": 1.0})
    metrics.flush()
    assert last_per_step(read_metrics(run), "loss") == {1: 1.0}


class _FullDisk:
    """A sink whose writes fail, as TensorBoard's does on a full disk."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        raise OSError(28, "No space left on device")

    def text(self, step: int, tag: str, text: str) -> None:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


def test_a_failing_sink_is_dropped_and_never_fails_a_commit(tmp_path: Path, caplog) -> None:
    run = Store(str(tmp_path / "run"))
    metrics = MetricsLog(run, enabled=True, sinks=[_FullDisk()])
    with caplog.at_level("WARNING"):
        metrics.record(1, {"loss": 1.0})
        metrics.commit(1, {"write_s": 0.1})  # runs inside the checkpointer's commit
    assert metrics.sinks == [] and "No space left on device" in caplog.text
    metrics.flush()
    assert last_per_step(read_metrics(run), "loss") == {1: 1.0}


def test_a_run_dir_that_does_not_answer_holds_the_lines_until_it_does(
    tmp_path: Path, caplog
) -> None:
    """Tiered checkpoints flush the metrics on a thread of their own (`flush_soon`): a run.dir
    that cannot take the append (here a file where its directory should be) holds the lines,
    says so once, and writes them all, in order, once it answers; `flush` without
    hold_on_failure still fails its caller."""
    blocked = tmp_path / "run"
    blocked.write_text("not a directory")
    run = Store(str(blocked))
    metrics = MetricsLog(run, enabled=True)
    for step in (1, 2):
        metrics.record(step, {"loss": float(step)})
    with caplog.at_level("WARNING", logger="orchestrator.metrics"):
        metrics.flush_soon()
        runs.wait_until(lambda: metrics.held == 2, "the lines held")
        metrics.record(3, {"loss": 3.0})
        metrics.flush_soon()  # within HOLD_RETRY_S of the failed try: not tried again
        with pytest.raises(OSError):
            metrics.flush()
        assert metrics.held == 3
        blocked.unlink()
        metrics.flush_soon()
        metrics.flush(hold_on_failure=True)  # waits for the thread's append, if it runs
    held = [r.getMessage() for r in caplog.records if "cannot append" in r.getMessage()]
    assert len(held) == 1, held
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert metrics.held == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
