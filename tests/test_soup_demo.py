"""The soup demo's selection never reads the test split.

Three small fine-tunes from one start (real committed checkpoints, each run dir with its
config.yaml) are souped with the demo's own code (`launch.soup_demo.make_soup`, greedy and
learned) twice: with the true test labels and with random ones. Every choice (greedy's order,
tries and chosen set; learned's weights and losses; the best single ingredient by validation)
must be identical; only the reported test scores may move (and do, which shows the test split
was really swapped).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from launch.soup_demo import best_single, make_soup, results_table
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.config import load, to_yaml
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store

TASK = [
    "task._target_=tests.soup_tasks.RelabelledTest", "task.split=finetune", "task.hidden=32",
    "task.n_train=2000", "task.n_eval=2000", "task.noise=0.2", "task.shift=2.0",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet_autograd() -> Iterator[None]:
    # At DEBUG (pytest's log level here) autograd hooks logging onto every backward graph,
    # which makes these few hundred tiny steps take minutes on a loaded machine.
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.WARNING)
    yield
    torch_log.setLevel(level)


def _sweep(root: Path, relabel: int) -> None:
    """Three runs under `root`, fine-tuned from one start with different lrs and data orders."""
    base = load("configs/soup-demo.yaml", [*TASK, f"task.test_relabel_seed={relabel}"])
    for i, lr in enumerate((0.003, 0.01, 0.03)):
        run = root / f"{i}-lr={lr}"
        cfg = dataclasses.replace(base, run=dataclasses.replace(base.run, dir=str(run)))
        from orchestrator.tasks import build_task

        task = build_task(cfg.task.target, dict(cfg.task.params))
        torch.manual_seed(0)  # one start for every ingredient
        model = task.build_model()
        optim = torch.optim.AdamW(model.parameters(), lr=lr)
        x, y = task.train_set().tensors
        gen = torch.Generator().manual_seed(i)
        for _ in range(60):
            idx = torch.randint(len(x), (64,), generator=gen)
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optim.step()
            optim.zero_grad()
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(to_yaml(cfg))
        ckpt = Checkpointer(Store(str(run)))
        ckpt.register("train", ModelAndOptimizer(model, optim))
        ckpt.save(60, {"eval/accuracy": 0.5})  # sweep runs pick their best by soup.metric


def _soups(root: Path, relabel: int) -> dict[str, dict]:
    _sweep(root, relabel)
    cfg = load("configs/soup-demo.yaml", [*TASK, f"run.dir={root}", "soup.learned_epochs=1"])
    return {recipe: make_soup(cfg, recipe) for recipe in ("greedy", "learned")}


def test_the_soup_demos_choices_never_depend_on_the_test_split(tmp_path: Path) -> None:
    true = _soups(tmp_path / "true", -1)
    shutil.rmtree(tmp_path / "true" / "soups")
    noise = _soups(tmp_path / "relabelled", 1)
    g1, g2 = true["greedy"]["details"], noise["greedy"]["details"]
    strip = lambda d: {k: v for k, v in d.items() if k != "tries"}  # noqa: E731
    assert strip(g1) == strip(g2) and g1["order"] and g1["chosen"]
    assert [t["accepted"] for t in g1["tries"]] == [t["accepted"] for t in g2["tries"]]
    assert [t["scores"] for t in g1["tries"]] == [t["scores"] for t in g2["tries"]]
    l1, l2 = true["learned"]["details"], noise["learned"]["details"]
    assert l1["weights"] == l2["weights"] and l1["epoch_losses"] == l2["epoch_losses"]
    for recipe in ("greedy", "learned"):
        pick = [
            best_single(r[recipe], "eval/accuracy")["path"].split("/")[-3] for r in (true, noise)
        ]
        assert pick[0] == pick[1]
        a, b = true[recipe]["soup_scores"], noise[recipe]["soup_scores"]
        assert a["eval/accuracy"] == b["eval/accuracy"]  # validation: the same soup
        assert a["test/accuracy"] != b["test/accuracy"]  # the test split really was swapped
        assert b["test/accuracy"] < 0.2  # random labels: chance is 0.1
    assert "best single (by validation)" in results_table({**true, "uniform": true["greedy"]})
