"""`make merge-demo`: does a merge of a constant-LR window replace the LR decay?

    python -m launch.merge_demo [CONFIG] [key=value ...] [--seeds N] [--readme]

For each seed (run.seed = 0..N-1), every step a real `stockpot run` or `stockpot soup`:

1. stable: CONFIG as it is (warmup, then a constant LR) for T = trainer.max_steps steps, a
   checkpoint every checkpoint.every_steps, an EMA kept (trainer.ema).
2. decay: the stable run's checkpoint at T - D copied into a run dir of its own and resumed
   with `scheduler.name=wsd` and a cooldown over the last D steps (`scheduler.cooldown_steps`,
   shape `scheduler.cooldown_shape`): the usual decay phase, from the same weights, optimizer
   state and data position.
3. merges: the stable run's checkpoints in the window [T - D, T] merged with
   `stockpot soup --recipe window` and each rule in RULES; and the stable run's EMA at T.

The text: the bundled corpus (250 kB) is too small for a pretraining-like run (a few thousand
steps would loop over it many times and overfit), so unless `task.text_path` is given, the demo
trains on this Python's own standard library sources (its top-level `*.py` files in name
order, ~4.7 MB for 3.11), written to `<out>/corpus.txt`: every step sees new bytes, and the
held-out split (the last 5%) is modules the model never trained on. Every model is scored by
the same code on the same held-out bytes, in bits per byte (eval/loss / ln 2). The table (mean and spread over seeds) goes to
`<out>/merge-demo.md`, the plot to `<out>/merge-demo.png`; `--readme` writes both into
README.md (between the merge-demo markers) and docs/merge-demo.png, whatever they show.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.config import Config, load

CONFIG = "configs/merge-demo.yaml"
RULES = ("uniform", "linear", "decay:linear", "decay:minus-sqrt", "ema:0.99")
README_BEGIN = "<!-- merge-demo:begin (written by `make merge-demo README=1`; do not edit) -->"
README_END = "<!-- merge-demo:end -->"
LN2 = math.log(2)


@dataclasses.dataclass
class Plan:
    """What one demo runs: its config and the window."""

    config: str
    overrides: list[str]
    cfg: Config
    seeds: int
    out: Path

    @property
    def steps(self) -> int:
        return self.cfg.trainer.max_steps

    @property
    def window(self) -> int:
        """D: the decay branch's cooldown and the merge window, in steps."""
        from orchestrator.optim import cooldown_steps

        return cooldown_steps(self.cfg.scheduler, self.steps)

    @property
    def ema_prefix(self) -> str:
        """trainer.ema's first decay as its checkpoint prefix: 0.995 -> ema_995."""
        return "ema_" + repr(float(self.cfg.trainer.ema[0])).partition(".")[2]


def main(argv: list[str]) -> int:
    readme = "--readme" in argv
    argv = [a for a in argv if a != "--readme"]
    seeds = 3
    if "--seeds" in argv:
        k = argv.index("--seeds")
        seeds = int(argv[k + 1])
        del argv[k : k + 2]
    path, overrides = (argv[0], argv[1:]) if argv and "=" not in argv[0] else (CONFIG, argv)
    cfg = load(path, overrides)
    plan = Plan(path, overrides, cfg, seeds, Path(cfg.run.dir))
    _check(plan)
    t0 = time.monotonic()
    if plan.out.exists():
        print(f"merge-demo: starting afresh: removing {plan.out}")
        shutil.rmtree(plan.out)
    if cfg.task.params.get("text_path") is None:
        plan.overrides = [*plan.overrides, f"task.text_path={_stdlib_corpus(plan.out)}"]
    results = [run_seed(plan, seed) for seed in range(seeds)]
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "merge-demo.json").write_text(json.dumps(results, indent=1) + "\n")
    table = results_table(plan, results)
    png = plot(plan, results)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "merge-demo.md").write_text(table + "\n")
    (plan.out / "merge-demo.png").write_bytes(png)
    print(f"\n=== merge demo: {seeds} seeds, {time.monotonic() - t0:.0f} s ===")
    print(table)
    print(f"plot: {plan.out / 'merge-demo.png'}")
    if readme:
        write_readme(table, png)
    return 0


def _stdlib_corpus(out: Path) -> Path:
    """This Python's top-level standard library sources, concatenated in name order."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    path = out / "corpus.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for file in files:
            f.write(file.read_bytes())
    print(
        f"merge-demo: corpus: {len(files)} standard library files, {path.stat().st_size / 1e6:.1f} MB"
    )
    return path


def _check(plan: Plan) -> None:
    cfg = plan.cfg
    if cfg.scheduler.name != "constant" or not cfg.trainer.ema or plan.seeds < 1:
        raise SystemExit(
            "merge-demo: the stable run needs scheduler.name=constant, trainer.ema and --seeds >= 1"
        )
    every = cfg.checkpoint.every_steps
    if not every or (plan.steps - plan.window) % every or cfg.checkpoint.keep_last is not None:
        raise SystemExit(
            "merge-demo: checkpoint.every_steps must divide the steps before the window, and "
            "checkpoint.keep_last must be null (the window's checkpoints are merged)"
        )


def run_seed(plan: Plan, seed: int) -> dict[str, float]:
    """Every model of one seed, scored: name -> held-out bits per byte."""
    from orchestrator.checkpoint import catalog
    from orchestrator.soup.evaluate import Judge
    from orchestrator.storage import Store

    root = plan.out / f"seed-{seed}"
    stable, decay = root / "stable", root / "decay"
    seeded = [*plan.overrides, f"run.seed={seed}", f"run.name=merge-demo-{seed}"]
    _stockpot(["run", plan.config, *seeded, f"run.dir={stable}"], f"seed {seed}: stable run")
    start = plan.steps - plan.window
    infos = {i.step: i for i in catalog.scan(Store(str(stable))).committed}
    (decay / "checkpoints").mkdir(parents=True)
    shutil.copytree(stable / infos[start].rel, decay / infos[start].rel)
    _stockpot(
        ["run", plan.config, *seeded, f"run.dir={decay}", "scheduler.name=wsd",
         f"scheduler.cooldown_steps={plan.window}", "resume.allow_config_change=true"],
        f"seed {seed}: decay branch from step {start}",
    )  # fmt: skip
    judge = Judge(str(stable), None, "eval/loss", "min", batch_size=64)

    def bits(state: dict[str, Any]) -> float:
        return judge.score(state)["eval/loss"] / LN2

    final = infos[plan.steps]
    scores = {
        "constant LR, final": bits(_weights(stable / final.rel)),
        "decay branch, final": bits(_weights(decay / final.rel)),
        f"EMA {plan.cfg.trainer.ema[0]}, final": bits(
            _weights(stable / final.rel, plan.ema_prefix)
        ),
    }
    for rule in RULES:
        scores[f"merge {rule}"] = bits(_window_merge(stable, rule, start, plan.steps))
    print(f"merge-demo: seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return scores


def _stockpot(args: list[str], what: str) -> None:
    print(f"merge-demo: {what}", flush=True)
    t0 = time.monotonic()
    argv = [sys.executable, "-m", "launch", *args, "logging.tensorboard=false"]
    code = subprocess.call(argv, env=dict(os.environ))
    if code != 0:
        raise SystemExit(f"merge-demo: {what} failed with exit {code}")
    print(f"merge-demo: {what} done in {time.monotonic() - t0:.0f} s", flush=True)


def _weights(checkpoint: Path, prefix: str = "auto") -> dict[str, Any]:
    """A checkpoint's model (or its EMA) through `stockpot export`, as a user gets it."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="merge-demo-") as tmp:
        out = Path(tmp) / "model.safetensors"
        argv = [sys.executable, "-m", "launch", "export", str(checkpoint), "--out", str(out),
                "--prefix", prefix]  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True)
        return load_file(out)


def _window_merge(run: Path, rule: str, lo: int, hi: int) -> dict[str, Any]:
    """`stockpot soup RUN --recipe window --weights RULE --steps lo:hi`, read back."""
    from safetensors.torch import load_file

    name = "window-" + rule.replace(":", "-")
    argv = [sys.executable, "-m", "launch", "soup", str(run), "--recipe", "window",
            "--weights", rule, "--steps", f"{lo}:{hi}", "--name", name]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True)
    out = run / "soups" / name
    state: dict[str, Any] = {}
    for shard in sorted(out.rglob("*.safetensors")):
        state.update(load_file(shard))
    return state


DECAY, CONSTANT = "decay branch, final", "constant LR, final"


def results_table(plan: Plan, results: list[dict[str, float]]) -> str:
    """Mean and sd over seeds; and, since the seeds differ more than the models do, each
    model's difference to the decay branch of the same seed (paired), and its share of the
    decay's gain over the constant-LR model."""
    names = list(results[0])
    decay = statistics.fmean(r[DECAY] for r in results)
    const = statistics.fmean(r[CONSTANT] for r in results)
    lines = [
        f"| model (CharLM, {plan.steps} steps, window = cooldown = last {plan.window}) | held-out "
        f"bits/byte, mean ± sd over {len(results)} seeds | per seed | minus the decay branch, "
        "same seed: mean (min, max) | share of the decay's gain |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        values = [r[name] for r in results]
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        paired = [r[name] - r[DECAY] for r in results]
        delta = f"{statistics.fmean(paired):+.4f} ({min(paired):+.4f}, {max(paired):+.4f})"
        share = (const - mean) / (const - decay) if const != decay else math.nan
        per_seed = " / ".join(f"{v:.4f}" for v in values)
        lines.append(f"| {name} | {mean:.4f} ± {sd:.4f} | {per_seed} | {delta} | {share:.0%} |")
    return "\n".join(lines)


def plot(plan: Plan, results: list[dict[str, float]]) -> bytes:
    """Each model's bits per byte: one point per seed, the mean as a bar."""
    import matplotlib

    from orchestrator.soup.report import png_bytes

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results[0])
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    means = [statistics.fmean(r[n] for r in results) for n in names]
    ax.bar(range(len(names)), means, color=["C7", "C3", "C2", *["C0"] * len(RULES)], alpha=0.6)
    for seed, r in enumerate(results):
        ax.scatter(range(len(names)), [r[n] for n in names], color="k", s=10, zorder=3,
                   label="seeds" if seed == 0 else None)  # fmt: skip
    low = min(min(r.values()) for r in results)
    high = max(max(r.values()) for r in results)
    ax.set_ylim(low - 0.15 * (high - low), high + 0.15 * (high - low))
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(f"merge-demo: merges of the last {plan.window} constant-LR steps vs their decay")
    ax.legend(fontsize=7)
    return png_bytes(fig)


def write_readme(table: str, png: bytes) -> None:
    from launch.soup_demo import write_readme_block

    write_readme_block("merge-demo", README_BEGIN, README_END, table, png)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
