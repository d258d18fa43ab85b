"""Recovery without a person (`stockpot run`'s supervisor, launch/supervise.py): a rank killed
by SIGKILL or hung by SIGSTOP mid-run makes every rank start again from the newest commit, and
the run ends bit-identical to an uninterrupted one; a bug that repeats at the same step gets one
restart, then stops with its cause; a config error none. Real ranks on gloo, real signals, the
fault injected from inside the rank (tests/fault_tasks.py), each counted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from orchestrator import ending
from orchestrator.storage import Store
from tests import runs
from tests.ckpt_helpers import assert_same, final_state

MAX_STEPS, EVERY = runs.REFERENCE_STEPS, runs.REFERENCE_EVERY
FAULTY = "task._target_=tests.fault_tasks.Faulty"
RESTARTED = "starting every rank again from the newest commit"


def lives(run_dir: Path) -> list[dict]:
    return ending.lives(ending.read_ends(Store(str(run_dir))))


@pytest.mark.parametrize(
    ("fault", "parallel", "extra"),
    # The kill's restart takes standby ranks (launch/standby.py); the hang's starts cold.
    [
        ("kill", "ddp", ("launcher.standby_after_s=0",)),
        ("stop", "fsdp", ("trainer.collective_timeout_s=5",)),
    ],
)
def test_a_rank_killed_or_hung_recovers_in_place_bit_identical(
    fault: str, parallel: str, extra: tuple[str, ...], tmp_path: Path, demo_reference
) -> None:
    rng = random.Random(fault)
    at, rank = rng.randrange(EVERY + 1, MAX_STEPS - EVERY), rng.randrange(2)
    run_dir, marker, log = tmp_path / "run", tmp_path / "fault", tmp_path / "run.log"
    argv = [*runs.REFERENCE, f"run.dir={run_dir}", f"trainer.parallel={parallel}", FAULTY,
            f"task.fault={fault}", f"task.on_rank={rank}", f"task.at_step={at}",
            f"task.once={marker}", *extra]  # fmt: skip
    assert runs.stockpot_run(argv, log=log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert marker.read_text() == f"{fault} rank {rank} step {at}\n"  # the fault landed, once
    assert text.count(RESTARTED) == 1, text[-3000:]
    first, second = lives(run_dir)
    assert (first["class"], first["step"], second["class"]) == ("transient", at, "finished")
    if fault == "kill":
        assert f"rank {rank} was killed by SIGKILL" in first["cause"]
    else:  # the peer gave up on it after the collective timeout; the spawner then killed it
        assert "hung past trainer.collective_timeout_s" in text
        assert f"rank {rank} did not exit after another rank failed" in text
    newest_before = (at - 1) // EVERY * EVERY  # every commit before the fault's step
    runs.assert_resumed_from(run_dir, text, [newest_before])
    ref = demo_reference(parallel)
    assert_same(final_state(ref, MAX_STEPS), final_state(run_dir, MAX_STEPS))
    assert runs.losses(run_dir) == runs.losses(ref)


def test_a_bug_at_the_same_step_gets_one_restart_then_stops_with_its_cause(
    tmp_path: Path,
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    argv = [*runs.REFERENCE, f"run.dir={run_dir}", FAULTY, "task.fault=raise", "task.at_step=6",
            "launcher.max_restarts=3"]  # fmt: skip
    assert runs.stockpot_run(argv, log=log) == 1
    text = log.read_text()
    assert text.count(RESTARTED) == 1, text[-3000:]
    assert "rank 1: ValueError: injected bug at step 6" in text
    assert "the same failure ended an earlier life at this step: deterministic" in text
    assert [(life["class"], life["step"]) for life in lives(run_dir)] == [
        ("transient", 6),
        ("deterministic", 6),
    ]
    assert "ValueError: injected bug at step 6" in lives(run_dir)[-1]["cause"]


def test_a_config_error_on_the_ranks_is_never_restarted(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    argv = [*runs.REFERENCE, f"run.dir={run_dir}", "optim._target_=torch.optim.NoSuchOptimizer"]
    assert runs.stockpot_run(argv, log=log) == 2
    text = log.read_text()
    assert RESTARTED not in text and "NoSuchOptimizer" in text
    (life,) = lives(run_dir)
    assert life["class"] == "deterministic" and "NoSuchOptimizer" in life["cause"]
