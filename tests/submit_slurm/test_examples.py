"""The examples (a user's own training loop, examples/) submitted to the real Slurm cluster,
preempted by a job on the `high` partition: each requeues once, resumes from the step its stop
saved, and ends bit-identical to an uninterrupted local run of the same config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import runs
from tests.ckpt_helpers import assert_same, final_state
from tests.submit_slurm.scenarios import EXAMPLE_STEPS, metrics, scenario, stop_line, task_results

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]


@pytest.mark.parametrize("example", ["nanogpt", "hf_gpt2"])
def test_example_preempted_on_slurm_requeues_once_and_ends_bit_identical(
    scenarios: Any, example: str, tmp_path: Path
) -> None:
    sub = scenario(scenarios, f"{example}_high")
    assert sub.facts["state"] == "COMPLETED", sub.log()[-3000:]
    assert sub.facts["high_out"].read_text().strip() == "high ran"
    resumed = [m for m in metrics(sub) if m.get("event") == "resumed"]
    assert [(m["restart"], m["resumes"]) for m in resumed] == [(1, 1)], resumed
    signal_name, step, _ = stop_line(sub)
    assert signal_name == "SIGUSR2" and resumed[0]["step"] == step < EXAMPLE_STEPS
    assert [(r["rank"], r["finished"], r["restart"]) for r in task_results(sub)] == [
        (0, True, 1),
        (1, True, 1),
    ]
    # The same config, uninterrupted, here: one CPU thread per rank, as the job's tasks had.
    ref = tmp_path / "ref"
    argv = [runs.STOCKPOT, "run", f"examples/{example}/config.yaml", f"run.dir={ref}",
            f"trainer.max_steps={EXAMPLE_STEPS}", "checkpoint.every_steps=5",
            "trainer.log_every=1", "logging.tensorboard=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=runs.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(final_state(sub.run_dir, EXAMPLE_STEPS), final_state(ref, EXAMPLE_STEPS), example)
    assert runs.losses(sub.run_dir) == runs.losses(ref)
