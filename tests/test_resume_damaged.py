"""A real 2-rank `stockpot run` resumed over a damaged newest checkpoint: one loud line naming
the file, the fallback to the previous checkpoint, no traceback, and the end bit-identical to an
uninterrupted run.

The small files (DCP's `.metadata`, each rank's state) are parsed whole, so they are verified
before anything parses them (restoring.py); a `.metadata` that DCP unpickled first made torch log
our CheckpointCorrupt with a traceback from every rank ("Rank local metadata is not found").
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.format import rank_state_name
from orchestrator.storage import Store
from tests import runs
from tests.ckpt_helpers import assert_same, final_state

MAX_STEPS, HALF, EVERY = 12, 8, 4
BASE = [
    "configs/demo.yaml", "trainer.log_every=1", "trainer.eval_every=4",
    f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=3", *runs.SMALL_DATA,
    # The LR horizon fixed, so the run stopped at HALF continues as the uninterrupted one runs.
    f"scheduler.decay_steps={MAX_STEPS}",
]  # fmt: skip


def _run(run_dir: Path, steps: int, log: Path) -> None:
    argv = [*BASE, f"run.dir={run_dir}", f"trainer.max_steps={steps}"]
    assert runs.stockpot_run(argv, log=log) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def runs_made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an uninterrupted run to MAX_STEPS, a run stopped at HALF): made once, copied per test."""
    root = tmp_path_factory.mktemp("damaged")
    _run(root / "ref", MAX_STEPS, root / "ref.log")
    _run(root / "half", HALF, root / "half.log")
    return root / "ref", root / "half"


@pytest.mark.parametrize("target", [".metadata", rank_state_name(0)])
def test_random_bytes_in_a_small_file_fall_back_in_one_line(
    target: str, runs_made: tuple[Path, Path], tmp_path: Path
) -> None:
    ref, half = runs_made
    run_dir = tmp_path / "run"
    shutil.copytree(half, run_dir)
    newest = catalog.scan(Store(str(run_dir))).latest()
    assert newest is not None and newest.step == HALF
    victim = run_dir / newest.data_rel / target
    victim.write_bytes(random.Random(target).randbytes(victim.stat().st_size))
    log = tmp_path / "resume.log"
    _run(run_dir, MAX_STEPS, log)
    text = log.read_text()
    runs.assert_resumed_from(run_dir, text, [HALF - EVERY])
    restore = text[: text.index("resumed from step")].splitlines()
    naming = [line for line in restore if str(victim) in line]
    assert len(naming) == 1 and "FAILED verification" in naming[0], restore[-20:]
    assert "Traceback" not in text and "Rank local metadata" not in text, text[-3000:]
    assert_same(final_state(ref, MAX_STEPS), final_state(run_dir, MAX_STEPS))
    assert runs.losses(run_dir) == runs.losses(ref)
