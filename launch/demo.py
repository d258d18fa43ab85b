"""`make demo`: train the demo, interrupt it with a real signal midway, resume, summarise.

    python -m launch.demo [CONFIG] [key=value ...]

1. `stockpot run CONFIG` starts (2 local ranks on the demo config) in a fresh run dir.
2. Once it has committed a checkpoint a quarter of the way in, the job gets SIGUSR2, as Slurm
   sends before a time limit: the ranks agree at the next step boundary, save, and exit 75.
3. `stockpot run CONFIG` again resumes from the newest committed checkpoint and finishes.
4. A summary: steps, restarts, checkpoints, final held-out accuracy (read from the run dir).
5. A checkpoint soup of the run: the uniform mean of the second half's checkpoints that improved
   on any tracked metric (`improved_any`, kept as weights only by checkpoint.keep_weights_every_steps),
   best single checkpoint (by validation) vs the soup on the test split.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.config import Config, load
from orchestrator.config.soup import soup_out_dir
from orchestrator.env import EXIT_STOPPED as STOPPED
from orchestrator.errors import UsageError
from orchestrator.storage import Store


def main(argv: list[str]) -> int:
    path, overrides = (argv[0], argv[1:]) if argv else ("configs/demo.yaml", [])
    cfg = load(path, overrides)
    if not Store(cfg.run.dir).local_paths:
        raise SystemExit(f"make demo trains on local disk; give a local run.dir, not {cfg.run.dir}")
    run_dir = Path(cfg.run.dir)
    if run_dir.exists():
        print(f"demo: starting afresh: removing the previous demo run {run_dir}")
        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "launch", "run", path, *overrides]
    first = _interrupted_run(command, run_dir, cfg)
    if first not in (0, STOPPED):
        print(f"demo: the first run failed with exit {first}", file=sys.stderr)
        return first
    if first == STOPPED:
        print(
            f"\ndemo: the job saved and stopped (exit {STOPPED}); starting it again to resume\n",
            flush=True,
        )
        code = subprocess.call(command)
        if code != 0:
            print(f"demo: the resumed run failed with exit {code}", file=sys.stderr)
            return code
    _summary(cfg, run_dir)
    _checkpoint_soup(cfg, run_dir)
    return 0


def _interrupted_run(command: list[str], run_dir: Path, cfg: Config) -> int:
    from orchestrator.checkpoint import catalog

    job = subprocess.Popen(command)
    store = Store(str(run_dir))
    quarter = max(1, cfg.trainer.max_steps // 4)
    while job.poll() is None:
        latest = catalog.scan(store).latest() if run_dir.exists() else None
        if latest is not None and latest.step >= quarter:
            print(
                f"\ndemo: sending SIGUSR2 to the job (pid {job.pid}), as Slurm does before a "
                "time limit\n",
                flush=True,
            )
            job.send_signal(signal.SIGUSR2)
            break
        time.sleep(0.1)
    code = job.wait()
    if code == 0:
        print("\ndemo: the job finished before a stop could land; nothing to resume\n", flush=True)
    return code


def _summary(cfg: Config, run_dir: Path) -> None:
    from orchestrator.checkpoint import catalog
    from orchestrator.metrics import last_per_step, read_metrics
    from orchestrator.storage import Store

    store = Store(str(run_dir))
    scan = catalog.scan(store)
    records = read_metrics(store)
    accuracy = last_per_step(records, "eval/accuracy")
    steps = max((r["step"] for r in records), default=0)
    print("\n=== stockpot demo summary ===")
    print(f"run dir        {run_dir}")
    print(f"steps trained  {steps} of {cfg.trainer.max_steps}")
    resumes = [r for r in records if r.get("event") == "resumed"]
    where = ", ".join(f"from step {r['step']}" for r in resumes)
    print(f"restarts       {len(resumes)}" + (f" (resumed {where})" if resumes else ""))
    print(
        f"checkpoints    {', '.join(str(c.step) for c in scan.committed)} (committed, verified on resume)"
    )
    if accuracy:
        last = max(accuracy)
        print(f"held-out acc   {accuracy[last]:.3f} at step {last} (chance: 0.10)")
    print(f"inspect        stockpot status {run_dir}   |   stockpot verify {run_dir}")
    if (run_dir / "tb").is_dir():  # logging.tensorboard: one event file per life of the run
        print(f"tensorboard    tensorboard --logdir {run_dir / 'tb'}   (restarts: events/resumes)")
    print(f"curves         stockpot plot {run_dir} --out curves.png")
    full = [c.manifest.total_bytes for c in scan.committed if not c.manifest.weights_only]
    kept = sum(c.manifest.total_bytes for c in scan.committed)
    if full:  # what keeping these checkpoints whole would take: the newest full one's size each
        thin = sum(c.manifest.weights_only for c in scan.committed)
        print(f"storage        {kept / 1e3:.0f} kB kept ({thin} weights-only) vs "
              f"{full[-1] * len(scan.committed) / 1e3:.0f} kB if all were full")  # fmt: skip


def _checkpoint_soup(cfg: Config, run_dir: Path) -> None:
    """The BirdCLEF-style checkpoint soup: the checkpoints of the run's second half that improved
    on any tracked metric; selection on the validation split, the test split only reported."""
    from orchestrator.config import SoupConfig
    from orchestrator.soup import cook, scoring

    rule: tuple[str, ...] = ("eval/loss", "eval/accuracy")
    soup = SoupConfig(improved_any=rule, steps=f"{cfg.trainer.max_steps // 2}:",
                      metric="eval/accuracy", report=True, name="checkpoints")  # fmt: skip
    out = soup_out_dir(str(run_dir), soup)
    try:
        kitchen = cook.prepare([str(run_dir)], soup, None, out=out)
    except UsageError as e:  # a short or overridden run: too few checkpoints improved
        print(f"\ndemo: {e}; souping every checkpoint of the second half instead")
        rule, soup = (), dataclasses.replace(soup, improved_any=())
        kitchen = cook.prepare([str(run_dir)], soup, None, out=out)
    record = cook.cook(kitchen)  # report=True: the soup is scored on validation and test
    steps = [i["step"] for i in record["ingredients"]]
    # A uniform soup scores no ingredient: score them here, choose the best by validation.
    scores = scoring.score_ingredients(kitchen)
    best = {"scores": max(scores, key=lambda s: s["eval/accuracy"])}
    how = f", improved_any {', '.join(rule)}" if rule else ""
    print(f"\n=== checkpoint soup (uniform over steps {steps}: second half{how}) ===")
    for name, got in (("best single", best["scores"]), ("soup", record["soup_scores"])):
        print(f"{name:<12}   validation acc {got['eval/accuracy']:.4f}   "
              f"test acc {got['test/accuracy']:.4f}")  # fmt: skip
    print(f"written        {kitchen.out} (SOUP.json: inputs, checksums, scores)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
