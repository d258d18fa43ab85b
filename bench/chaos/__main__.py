"""`python -m bench.chaos [--trials N] [--only SCENARIO ...] [--s3-fault-rate R]` (`make chaos`).

Runs N trials (quick mode: one cycle, 26) round-robin over the scenarios, each variant in turn, prints a
line per trial and a summary, writes bench/chaos.json and (--readme) README's Reliability table.
Exit 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench.chaos import crashes, faults, inputs, jobs, report, tiers
from bench.chaos.jobs import Trial
from bench.chaos.s3env import S3Env, s3_faults
from orchestrator.storage import Store

# One cycle of the schedule: kills weigh most, every scenario appears.
CYCLE = ("kill", "setup", "crash-kill", "tier-kill", "corrupt", "kill", "s3", "disk-full",
         "tier-stop", "kill", "corrupt", "crash-bug", "hang", "tier-wipe", "setup", "kill",
         "corrupt", "setup", "crash-hang", "tier-outage", "s3", "corrupt", "setup", "kill",
         "corrupt", "setup")  # fmt: skip
QUICK_TRIALS = len(CYCLE)


def variants(scenario: str) -> tuple[str, ...]:
    return {
        "kill": faults.KILL_VARIANTS,
        "s3": ("ddp-sync",),
        "disk-full": ("ddp-sync",),
        "hang": ("ddp-sync",),
        **crashes.CRASH_VARIANTS,
        **tiers.TIER_VARIANTS,
        "setup": inputs.SETUPS,
        "corrupt": tuple(f"{t}:{d}" for d in inputs.DAMAGES for t in inputs.TARGETS),
    }[scenario]


class Suite:
    def __init__(self, work: Path, rate: float, seed: int) -> None:
        self.work, self.rng = work, random.Random(seed)
        self.s3 = S3Env(work, rate)
        self._refs: dict[str, Store] = {}
        self._base: Path | None = None

    def refs(self, parallel: str) -> Store:
        """The uninterrupted run of `parallel` (made once)."""
        if parallel not in self._refs:
            run_dir = self.work / f"ref-{parallel}"
            argv = jobs.argv_for(str(run_dir), f"trainer.parallel={parallel}")
            code = jobs.run(argv, self.work / f"ref-{parallel}.log")
            jobs.check(code == 0, f"the uninterrupted {parallel} run exited {code}")
            self._refs[parallel] = Store(str(run_dir))
        return self._refs[parallel]

    def runner(self, scenario: str) -> Callable[[Trial, Path], None]:
        rng = self.rng
        return {
            "kill": lambda t, w: faults.kill(t, w, self.refs, rng),
            "disk-full": lambda t, w: faults.disk_full(t, w, self.refs, rng),
            "hang": lambda t, w: faults.hung_rank(t, w, self.refs, rng),
            **dict.fromkeys(crashes.FAULT, lambda t, w: crashes.crash(t, w, self.refs, rng)),
            "s3": lambda t, w: s3_faults(t, w, self.refs, rng, self.s3),
            "tier-kill": lambda t, w: tiers.kill(t, w, self.refs, rng),
            "tier-wipe": lambda t, w: tiers.wipe(t, w, self.refs, rng),
            "tier-stop": lambda t, w: tiers.stop(t, w, self.refs, rng),
            "tier-outage": lambda t, w: tiers.outage(t, w, self.refs, rng, self.s3),
            "setup": lambda t, w: inputs.bad_setup(t, w, self.s3),
            "corrupt": lambda t, w: inputs.corrupt(t, w, self.refs, rng, self.base()),
        }[scenario]

    def base(self) -> Path:
        if self._base is None:
            self._base = inputs.make_base(self.work)
        return self._base

    def trial(self, n: int, scenario: str, variant: str) -> Trial:
        trial = Trial(scenario, variant)
        work = self.work / f"{n:03d}-{scenario}"
        work.mkdir()
        t0 = time.monotonic()
        try:
            self.runner(scenario)(trial, work)
        except jobs.TrialFailed as exc:
            trial.ok, trial.why = False, str(exc)
        except Exception as exc:  # the harness itself broke: a failure too, with its story
            trial.ok, trial.why = False, f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        trial.seconds = round(time.monotonic() - t0, 1)
        if trial.ok:
            shutil.rmtree(work, ignore_errors=True)  # keep only failures to look at
        return trial


def schedule(n: int, only: list[str]) -> list[tuple[str, str]]:
    cycle = [s for s in CYCLE if not only or s in only]
    seen: dict[str, int] = {}
    plan = []
    for i in range(n):
        scenario = cycle[i % len(cycle)]
        k = seen[scenario] = seen.get(scenario, -1) + 1
        plan.append((scenario, variants(scenario)[k % len(variants(scenario))]))
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos")
    ap.add_argument("--trials", type=int, default=QUICK_TRIALS)
    ap.add_argument("--only", nargs="*", default=[], choices=sorted(set(CYCLE)))
    ap.add_argument("--s3-fault-rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--out", default=str(jobs.REPO / "bench" / "chaos.json"))
    ap.add_argument("--readme", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="stockpot-chaos-"))
    suite = Suite(work, args.s3_fault_rate, args.seed)
    t0 = time.monotonic()
    trials = []
    try:
        for n, (scenario, variant) in enumerate(schedule(args.trials, args.only)):
            trial = suite.trial(n, scenario, variant)
            trials.append(trial)
            mark = "ok  " if trial.ok else "FAIL"
            print(f"{mark} {n:3d} {scenario:11s} {variant:26s} {trial.seconds:6.1f}s {trial.why}",
                  flush=True)  # fmt: skip
    finally:
        suite.s3.close()
    result = report.summarize(trials, time.monotonic() - t0, args)
    Path(args.out).write_text(json.dumps({**result, "rows": [asdict(t) for t in trials]},
                                         indent=1) + "\n")  # fmt: skip
    print(report.table(result))
    if args.readme and not args.only:
        report.write_readme(result)
    if result["failures"] or args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
