"""Your own training loop (orchestrator/api.py) as an entry point of `stockpot run`: real ranks,
real signals. The examples (tests/test_examples.py) cover `t.steps()` under kills; this covers a
loop of its own (`restore`, `maybe_save`, `should_stop`) and the entry point's checks."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.metrics import read_metrics
from orchestrator.storage import Store
from tests import runs
from tests.ckpt_helpers import assert_same, final_state, state_at

MAX_STEPS = 120


def _config(tmp_path: Path, **task: float) -> Path:
    body = "\n".join(f"  {k}: {v}" for k, v in task.items()) or "  {}"
    path = tmp_path / "loop.yaml"
    path.write_text(
        "entrypoint: tests.user_loops:manual\n"
        f"run: {{dir: {tmp_path / 'run'}, name: loop}}\n"
        f"trainer: {{max_steps: {MAX_STEPS}, nproc: 2, parallel: ddp, ema: [0.99]}}\n"
        "checkpoint: {every_steps: 30}\n"
        "logging: {tensorboard: false}\n"
        f"task:\n{body}\n"
    )
    return path


def test_own_loop_stops_on_a_signal_saves_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = _config(tmp_path, sleep=0.005)
    log = tmp_path / "run.log"
    job = runs.start_job([str(cfg)], log)
    runs.wait_until(lambda: runs.newest_step(tmp_path / "run") >= 30, "the first commit", 180)
    ranks = runs.child_pids(job.pid)
    assert len(ranks) == 2, ranks
    with runs.frozen(ranks):  # the stop lands before another step
        at = max(r["step"] for r in read_metrics(Store(str(tmp_path / "run"))) if "loss" in r)
        job.send_signal(signal.SIGUSR2)
        runs.wait_until(lambda: all(runs.reached(p, signal.SIGUSR2) for p in ranks), "USR2")
    assert job.wait(timeout=120) == 75, log.read_text()[-3000:]
    stopped = runs.newest_step(tmp_path / "run")
    assert at <= stopped < MAX_STEPS, (at, stopped)
    assert "stop requested (SIGUSR2)" in log.read_text()
    assert runs.stockpot_run([str(cfg)], log=log) == 0, log.read_text()[-3000:]
    assert f"resumed from step {stopped}" in log.read_text()

    ref = tmp_path / "ref"  # uninterrupted
    ref_cfg = tmp_path / "ref.yaml"
    ref_cfg.write_text(cfg.read_text().replace(str(tmp_path / "run"), str(ref)))
    assert runs.stockpot_run([str(ref_cfg)], log=tmp_path / "ref.log") == 0
    want = final_state(ref, MAX_STEPS)
    assert any(k.startswith("ema_99.model.") for k in want)  # a user's loop gets trainer.ema
    assert_same(final_state(tmp_path / "run", MAX_STEPS), want)
    (counter,) = state_at(tmp_path / "run", MAX_STEPS, "counter.").values()
    assert int(counter) == MAX_STEPS  # the user's own object was saved and restored
    assert runs.losses(tmp_path / "run") == runs.losses(ref)


@pytest.mark.parametrize(
    ("entrypoint", "message"),
    [
        ("tests.no_such_module:main", "no module named 'tests.no_such_module'"),
        ("tests.user_loops:nope", "tests.user_loops has no function 'nope'"),
        ("tests.user_loops:zero_args", "zero_args() must take one argument, the Config"),
        ("tests.user_loop_broken:main", "importing tests.user_loop_broken failed: RuntimeError"),
        ("tests.user_loops", "entrypoint must be 'package.module:function'"),
    ],
)
def test_a_bad_entry_point_is_one_line_and_exit_2_before_any_rank(
    entrypoint: str, message: str, tmp_path: Path
) -> None:
    cfg = _config(tmp_path)
    t0 = time.monotonic()
    out = subprocess.run(
        [runs.STOCKPOT, "run", str(cfg), "--entrypoint", entrypoint, "trainer.nproc=1"],
        cwd=runs.REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("stockpot: error: "), out.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), "no rank started"
    print(f"{entrypoint}: refused in {time.monotonic() - t0:.1f} s")


def test_an_entry_point_that_never_trains_is_one_line(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    cfg = _config(tmp_path)
    code = runs.stockpot_run([str(cfg), "entrypoint=tests.user_loops:no_training"], log=log)
    assert code == 2, log.read_text()
    assert "returned without training: wrap its loop in" in log.read_text()


def test_a_script_torchrun_starts_trains_through_training(tmp_path: Path) -> None:
    """No stockpot launcher: torchrun starts the ranks, the script loads its config and calls
    `training(cfg)`, which joins torchrun's process group and logs as stockpot's ranks do."""
    cfg = _config(tmp_path)
    torchrun = str(Path(runs.STOCKPOT).parent / "torchrun")
    out = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "-m", "tests.user_loops", str(cfg),
         "trainer.max_steps=20", "checkpoint.every_steps=10"],
        cwd=runs.REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[rank 0] INFO stockpot.training: step 20/20 loss" in out.stderr
    assert runs.newest_step(tmp_path / "run") == 20
    assert sorted(runs.losses(tmp_path / "run")) == list(range(1, 21))
