"""`stockpot init NAME`: the scaffold trains end to end with the real `stockpot run` (2 ranks),
from the directory it was made in, with no install step."""

from __future__ import annotations

import subprocess
from pathlib import Path

from orchestrator.checkpoint import catalog
from orchestrator.metrics import last_per_step, read_metrics
from orchestrator.storage import Store
from tests.runs import STOCKPOT


def stockpot(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STOCKPOT, *argv], cwd=cwd, capture_output=True, text=True, timeout=400, check=False
    )


def test_scaffold_trains_end_to_end(tmp_path: Path) -> None:
    made = stockpot(tmp_path, "init", "my_task")
    assert made.returncode == 0, made.stderr
    assert "next: stockpot run my_task/config.yaml" in made.stdout
    assert {p.name for p in (tmp_path / "my_task").iterdir()} >= {
        "__init__.py", "task.py", "config.yaml",
    }  # fmt: skip
    run = stockpot(
        tmp_path, "run", "my_task/config.yaml", "trainer.max_steps=40", "trainer.eval_every=20",
        "checkpoint.every_steps=20",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    store = Store(str(tmp_path / "runs" / "my_task"))
    assert [c.step for c in catalog.scan(store).committed] == [20, 40]
    records = read_metrics(store)
    loss = last_per_step(records, "loss")
    assert loss[40] < loss[10], loss  # it learns
    assert last_per_step(records, "eval/accuracy")[40] > 0.5  # 4 classes: chance is 0.25


def test_init_refuses_an_existing_dir_and_a_bad_name(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    for name, why in (
        ("taken", "already exists"),
        ("my-task", "not usable"),
        ("class", "not usable"),
    ):
        out = stockpot(tmp_path, "init", name)
        assert out.returncode == 2 and why in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1  # one line
    assert list((tmp_path / "taken").iterdir()) == []
