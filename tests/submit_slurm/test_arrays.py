"""`stockpot submit` of a sweep on the real Slurm cluster: the job array's chained soup job never
runs when one element fails. (Its run after ALL elements, on S3: tests/test_soup_workflow.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from tests.submit_slurm.scenarios import scenario

# The scenarios share one node and queue behind each other: their package fixture may take
# longer than the suite's per-test limit on a slow machine; each wait stays bounded by WAIT_S.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]


def test_a_failed_element_never_runs_the_chained_job(scenarios: Any) -> None:
    sub = scenario(scenarios, "sweepfail")
    # --kill-on-invalid-dep: the chained job is cancelled, never left pending forever
    assert sub.facts["states"] == ["COMPLETED", "FAILED", "CANCELLED"]
    assert "task.hidden" in sub.log(job_id=sub.jobs[1]["job_id"])
    assert not list(sub.run_dir.rglob("model.safetensors"))
    assert not list(sub.run_dir.rglob("SOUP.json"))
    assert not (sub.log_dir / f"{sub.jobs[2]['job_id']}_0_result.pkl").exists()
