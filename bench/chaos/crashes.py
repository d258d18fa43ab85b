"""Crash recovery inside one `stockpot run` (`launcher.max_restarts`): a fault injected from
inside a rank by tests/fault_tasks.py's `Faulty` task, on a rank and at a step drawn from the
trial's seed.

crash-kill  a rank SIGKILLs itself once: the spawner starts every rank again from the newest
            commit; the one run exits 0, bit-identical to the uninterrupted run (weights and
            optimizer state).
crash-hang  a rank SIGSTOPs itself once: its peer gives up after trainer.collective_timeout_s
            with the lost-peer line; restarted the same way, bit-identical.
crash-bug   a rank raises at the same step in every life: one restart, then the run stops
            (exit 1) with a deterministic record naming the exception, restarts left unspent.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from bench.chaos import jobs
from bench.chaos.faults import KILL_VARIANTS, variant_args
from bench.chaos.jobs import EVERY, MAX_STEPS, STATE, Trial, argv_for, check
from orchestrator import ending
from orchestrator.storage import Store

CRASH_VARIANTS = {
    "crash-kill": KILL_VARIANTS,
    "crash-hang": ("ddp-sync",),
    "crash-bug": ("ddp-sync",),
}
FAULT = {"crash-kill": "kill", "crash-hang": "stop", "crash-bug": "raise"}
TIMEOUT_S = 5  # trainer.collective_timeout_s in crash-hang: the stopped rank is noticed soon
MAX_RESTARTS = 3  # launcher.max_restarts: a bug must stop after one, never use them all
RESTART = "starting every rank again from the newest commit"  # the supervisor's line, per restart
REPEATS = "the same failure ended an earlier life at this step: deterministic, not restarting"
SPENT = "restart(s) done, launcher.max_restarts"


def crash(trial: Trial, work: Path, refs, rng: random.Random) -> None:
    """One trial of `trial.scenario` (a key of FAULT): one `stockpot run`, judged by its log,
    its exit code and the records in `lives/`."""
    fault = FAULT[trial.scenario]
    rank, step = rng.randrange(2), rng.randrange(EVERY, MAX_STEPS - 1)
    trial.notes.update(rank=rank, step=step)
    run_dir, log, marker = work / "run", work / "run.log", work / "fault.marker"
    code = jobs.run(crash_argv(str(run_dir), trial.variant, fault, rank, step, marker), log)
    store, text = Store(str(run_dir)), log.read_text(errors="replace")
    lives = ending.lives(ending.read_ends(store))
    check(text.count(RESTART) == 1, f"{text.count(RESTART)} restarts in the log, not one")
    check(SPENT not in text, "launcher.max_restarts was spent")
    resumed, committed = jobs.resumed_from(log), last_commit_before(text, RESTART)
    expected = [committed] if committed else []  # a fresh start says nothing of resuming
    check(resumed == expected, f"resumed from {resumed}, not the newest commit {committed}")
    if fault == "raise":
        _judge_bug(trial, code, text, store, lives, rank, step)
        return
    landed = marker.read_text().splitlines() if marker.exists() else []
    check(landed == [f"{fault} rank {rank} step {step}"], f"the fault did not land once: {landed}")
    if fault == "kill":
        trial.kills += 1
    else:
        trial.faults += 1
    _judge_recovered(code, text, store, lives, fault, rank)
    jobs.judge(store, refs(trial.variant.split("-")[0]), log, parts=STATE)


def crash_argv(
    run_dir: str, variant: str, fault: str, rank: int, step: int, marker: Path
) -> list[str]:
    fault_args = ["task._target_=tests.fault_tasks.Faulty", f"task.fault={fault}",
                  f"task.on_rank={rank}", f"task.at_step={step}",
                  f"launcher.max_restarts={MAX_RESTARTS}"]  # fmt: skip
    if fault != "raise":  # a transient fault: once; a bug repeats in every life
        fault_args.append(f"task.once={marker}")
    if fault == "stop":  # only here: a spurious timeout on a busy machine would add a restart
        fault_args.append(f"trainer.collective_timeout_s={TIMEOUT_S}")
    return argv_for(run_dir, *variant_args(variant), *fault_args)


def _judge_recovered(
    code: int, text: str, store: Store, lives: list[dict], fault: str, rank: int
) -> None:
    """One transient life (every rank's record says so, the victim's names its fault), then a
    finished one, exit 0."""
    check(code == 0, f"the recovered run exited {code}")
    check([life["class"] for life in lives] == [ending.TRANSIENT, ending.FINISHED],
          f"lives {[(life['class'], life['cause'][:60]) for life in lives]}")  # fmt: skip
    first = _records(store, lives[0]["life"])
    check({e.klass for e in first} == {ending.TRANSIENT}, "the first life not all transient")
    if fault == "kill":
        _expect(first, rank, f"rank {rank} was killed by SIGKILL")
        return
    peer = 1 - rank
    noticed = f"[rank {peer}] ERROR stockpot: rank {peer}: a collective failed: rank {rank}"
    check(noticed in text, f"no lost-peer line from rank {peer}")
    _expect(first, peer, f"rank {rank} died, left or hung past")
    _expect(first, rank, "did not exit after another rank failed: SIGKILL from the spawner")


def _judge_bug(
    trial: Trial, code: int, text: str, store: Store, lives: list[dict], rank: int, step: int
) -> None:
    """The same exception at the same step in both lives: the second is deterministic."""
    bug = f"ValueError: injected bug at step {step}"
    raised = [e for e in ending.read_ends(store) if e.rank == rank and bug in e.cause]
    trial.faults += len(raised)
    check([e.step for e in raised] == [step, step], f"the bug landed {len(raised)} time(s), not 2")
    check(code == 1, f"the run exited {code} on a repeated bug, not 1")
    check([life["class"] for life in lives] == [ending.TRANSIENT, ending.DETERMINISTIC],
          f"lives {[(life['class'], life['cause'][:60]) for life in lives]}")  # fmt: skip
    check(bug in lives[1]["cause"], f"the deterministic cause does not name the bug: {lives[1]}")
    check(text.count(REPEATS) == 1, "no one line saying the bug repeated: deterministic")
    check(text.count(bug) >= 2, "the bug's own line is not in the log of both lives")
    jobs.verify_all(store)


def _records(store: Store, life: str) -> list[ending.EndRecord]:
    return [e for e in ending.read_ends(store) if e.life == life]


def _expect(records: list[ending.EndRecord], rank: int, cause: str) -> None:
    found = [e.cause for e in records if e.rank == rank]
    check(any(cause in c for c in found), f"rank {rank}'s record is not '{cause}': {found}")


def last_commit_before(text: str, line: str) -> int:
    """The newest step the log says was committed before `line` first appears (0: none)."""
    head = text.split(line, 1)[0]
    return max((int(s) for s in re.findall(r"committed \S*step-(\d+)", head)), default=0)
