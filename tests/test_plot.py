"""`stockpot plot`: curves from metrics.jsonl written by the real MetricsLog, drawn by the real
console script into a PNG; a restart shows as a red vertical line, only where there was one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from matplotlib import image

from launch.plot import series_from_records
from orchestrator.metrics import MetricsLog, read_metrics
from orchestrator.storage import Store
from tests.runs import REPO, STOCKPOT

RED = np.array([214, 39, 40]) / 255  # tab:red, the restart mark


def plot(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STOCKPOT, "plot", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def life(run: Store, start: int, resumes: int, steps: range, *, commit_every: int = 5) -> None:
    """What the leader logs in one life: loss every step, eval every 10, commits."""
    metrics = MetricsLog(run, enabled=True)
    metrics.start(start, resumes)
    for step in steps:
        metrics.record(step, {"loss": 2.0 / step + 0.01 * resumes, "lr": 1e-3})
        if step % 10 == 0:
            metrics.record(step, {"eval/loss": 1.0 / step, "eval/accuracy": step / 40})
        if step % commit_every == 0:
            metrics.commit(step, {"stage_s": 0.01, "write_s": 0.02})
    metrics.flush()


def red_columns(png: Path) -> int:
    pixels = image.imread(str(png))[:, :, :3]
    red = np.all(np.abs(pixels - RED) < 0.08, axis=2)
    return int((red.sum(axis=0) > pixels.shape[0] * 0.2).sum())  # tall red vertical lines


def test_resumed_run_has_each_step_once_and_its_restart_marked(tmp_path: Path) -> None:
    run = Store(str(tmp_path / "run"))
    life(run, 0, 0, range(1, 23))  # killed after step 22; newest commit 20
    life(run, 20, 1, range(21, 41))
    series = series_from_records("run", read_metrics(run))
    assert sorted(series.curves["loss"]) == list(range(1, 41))
    assert series.curves["loss"][21] == 2.0 / 21 + 0.01  # the re-trained value, not the lost one
    assert series.restarts == [20] and series.commits == list(range(5, 41, 5))

    out = plot(str(tmp_path / "run"), "--out", str(tmp_path / "curves.png"))
    assert out.returncode == 0, out.stderr
    assert "1 run(s), loss, eval/accuracy, eval/loss; 1 restart(s) marked" in out.stdout
    assert red_columns(tmp_path / "curves.png") >= 1


def test_sweep_dir_plots_every_run_and_no_restart_mark_without_restarts(tmp_path: Path) -> None:
    for name in ("0-lr=0.001", "1-lr=0.003"):
        life(Store(str(tmp_path / "sweep" / name)), 0, 0, range(1, 31))
    out = plot(str(tmp_path / "sweep"), "--out", str(tmp_path / "sweep.png"))
    assert out.returncode == 0, out.stderr
    assert "2 run(s)" in out.stdout and "0 restart(s) marked" in out.stdout
    assert red_columns(tmp_path / "sweep.png") == 0


def test_plot_refuses_a_dir_without_metrics_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = plot(str(tmp_path / "empty"), "--out", str(tmp_path / "x.png"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "has no metrics.jsonl" in out.stderr
    bad = plot(str(tmp_path / "empty"), "--out", str(tmp_path / "x.pdf"))
    assert bad.returncode == 2 and "--out must name a .png" in bad.stderr
