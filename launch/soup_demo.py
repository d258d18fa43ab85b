"""`make soup-demo`: pretrain once, fine-tune a sweep of ingredients from it, soup them three ways.

    python -m launch.soup_demo [CONFIG] [key=value ...] [--readme]

1. Pretrain: CONFIG with `task.split=pretrain` (PRETRAIN below) into `model.init_from`.
2. Fine-tune: every element of CONFIG's sweep (seeds x learning rates), each starting from the
   pretrained weights (`model.init_from`), each in its own run dir under `run.dir`.
3. Soup the sweep dir with `uniform`, `greedy` and `learned` (`<run.dir>/soups/<recipe>`).
   Selection (greedy's order and tries, learned's coefficients, "best single") uses the
   validation split only; the test split is only reported (tests/test_soup_demo.py checks it).
4. Print best single / uniform / greedy / learned on the test split; write the table
   (`<run.dir>/soup-demo.md`) and the plot (`<run.dir>/soup-demo.png`); `--readme` also puts
   both into README.md (between the soup-demo markers) and docs/soup-demo.png.

Every step is a real `stockpot run` (one process per run) or the soup engine in this process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from orchestrator.config import Config, expand_sweep, load, to_yaml
from orchestrator.config.soup import soup_out_dir
from orchestrator.storage import Store

PRETRAIN = [
    "task.split=pretrain",
    "task.n_train=20000",
    "trainer.max_steps=600",
    "optim.lr=0.003",
    "scheduler.name=cosine",
    "model.init_from=null",
]
RECIPES = ("uniform", "greedy", "learned")
SCORED = "greedy"  # its SOUP.json scores every ingredient (a uniform soup scores none)
README_BEGIN = "<!-- soup-demo:begin (written by `make soup-demo README=1`; do not edit) -->"
README_END = "<!-- soup-demo:end -->"
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    readme = "--readme" in argv
    argv = [a for a in argv if a != "--readme"]
    path, overrides = (argv[0], argv[1:]) if argv else ("configs/soup-demo.yaml", [])
    cfg = load(path, overrides)
    if not Store(cfg.run.dir).local_paths or not cfg.model.init_from or not cfg.sweep:
        raise SystemExit("the soup demo needs a local run.dir, model.init_from and a sweep")
    t0 = time.monotonic()
    for old in (Path(cfg.run.dir), Path(cfg.model.init_from)):
        if old.exists():
            print(f"soup-demo: starting afresh: removing {old}")
            shutil.rmtree(old)
    _stockpot_run(path, [*overrides, *PRETRAIN, f"run.dir={cfg.model.init_from}"], "pretrain")
    elements = expand_sweep(cfg)
    configs = Path(cfg.run.dir).parent / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    for i, element in enumerate(elements):
        element_yaml = configs / f"finetune-{i}.yaml"
        element_yaml.write_text(to_yaml(element))
        _stockpot_run(str(element_yaml), [], f"fine-tune {i + 1}/{len(elements)}")
    records = {recipe: make_soup(cfg, recipe) for recipe in RECIPES}
    table = results_table(records)
    png = plot(records)
    out = Path(cfg.run.dir)
    (out / "soup-demo.md").write_text(table + "\n")
    (out / "soup-demo.png").write_bytes(png)
    print(f"\n=== soup demo: {len(elements)} fine-tunes, {time.monotonic() - t0:.0f} s ===")
    print(table)
    print(f"plot: {out / 'soup-demo.png'}")
    if readme:
        write_readme(table, png)
    return 0


def _stockpot_run(config: str, overrides: list[str], what: str) -> None:
    print(f"soup-demo: {what}", flush=True)
    t0 = time.monotonic()
    # One intra-op thread: this MLP's ops are too small to split, and spinning threads on a
    # busy 2-core machine cost more than they give.
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    argv = [sys.executable, "-m", "launch", "run", config, *overrides, "logging.tensorboard=false"]
    code = subprocess.call(argv, env=env)
    if code != 0:
        raise SystemExit(f"soup-demo: {what} failed with exit {code}")
    print(f"soup-demo: {what} done in {time.monotonic() - t0:.0f} s", flush=True)


def make_soup(cfg: Config, recipe: str) -> dict[str, Any]:
    """One soup of the sweep's runs; selection on the validation split, the test split only
    scored for the report."""
    from orchestrator.soup import cook

    # out=None: three soups, each in its own <run.dir>/soups/<recipe>
    soup = dataclasses.replace(
        cfg.soup, recipe=cast(Any, recipe), name=recipe, report=True, out=None
    )
    out = soup_out_dir(cfg.run.dir, soup)
    kitchen = cook.prepare([cfg.run.dir], soup, cfg.storage, out=out)
    print(f"soup-demo: {recipe} soup of {len(kitchen.ingredients)} ingredients", flush=True)
    return dict(cook.cook(kitchen))


def best_single(record: dict[str, Any], metric: str) -> dict[str, Any]:
    """The ingredient with the best VALIDATION score (the test split never chooses)."""
    return max(record["ingredients"], key=lambda i: i["scores"][metric])


def results_table(records: dict[str, dict[str, Any]]) -> str:
    first = records[SCORED]
    metric = "eval/accuracy"
    best = best_single(first, metric)
    rows = [("best single (by validation)", best["scores"])]
    rows += [(f"{r} soup", records[r]["soup_scores"]) for r in RECIPES]
    chosen = {r: sum(i["in_soup"] for i in records[r]["ingredients"]) for r in RECIPES}
    n = len(first["ingredients"])
    lines = [
        "| model | ingredients | validation accuracy | test accuracy |",
        "|---|---|---|---|",
        f"| {rows[0][0]} | 1 of {n} | {rows[0][1][metric]:.4f} | {rows[0][1]['test/accuracy']:.4f} |",
    ]
    for (name, scores), recipe in zip(rows[1:], RECIPES, strict=True):
        lines.append(
            f"| {name} | {chosen[recipe]} of {n} | {scores[metric]:.4f} | "
            f"{scores['test/accuracy']:.4f} |"
        )
    return "\n".join(lines)


def plot(records: dict[str, dict[str, Any]]) -> bytes:
    """Each ingredient's test accuracy (points) and each soup's (lines)."""
    import matplotlib

    from orchestrator.soup.report import png_bytes

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    ings = records[SCORED]["ingredients"]
    labels = [i["run"].rsplit("/", 1)[-1].split("-", 1)[-1] for i in ings]
    ax.scatter(range(len(ings)), [i["scores"]["test/accuracy"] for i in ings], color="C0",
               label="fine-tunes (ingredients)")  # fmt: skip
    for k, recipe in enumerate(RECIPES):
        score = records[recipe]["soup_scores"]["test/accuracy"]
        ax.axhline(score, color=f"C{k + 1}", linestyle="-", label=f"{recipe} soup")
    ax.set_xticks(range(len(ings)), labels, rotation=30, ha="right", fontsize=6)
    ax.set_ylabel("test accuracy (20k samples)")
    ax.set_title("soup-demo: ingredients vs soups on the test split")
    return png_bytes(fig)


def write_readme(table: str, png: bytes) -> None:
    write_readme_block("soup-demo", README_BEGIN, README_END, table, png)


def write_readme_block(demo: str, begin: str, end: str, table: str, png: bytes) -> None:
    """Replace README.md's block between `begin` and `end` by `table` and the plot, written to
    docs/<demo>.png (make soup-demo / merge-demo README=1)."""
    readme = REPO / "README.md"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {demo} block ({begin} ... {end})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    (REPO / "docs" / f"{demo}.png").write_bytes(png)
    alt = demo.replace("-", " ")
    block = f"{begin}\n{table}\n\n![{alt}](docs/{demo}.png)\n{end}"
    readme.write_text(head + block + tail)
    print(f"{demo}: wrote the table into {readme} and docs/{demo}.png")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
