"""`stockpot submit` of a sweep on the real Slurm cluster: a job array whose chained soup job
runs after all elements (afterok), and never runs when one element fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.storage import Store
from tests.submit_slurm.scenarios import Submitted, scenario, task_results

# The scenarios share one node and queue behind each other: their package fixture may take
# longer than the suite's per-test limit on a slow machine; each wait stays bounded by WAIT_S.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]


def test_array_and_chained_export(scenarios: Any) -> None:
    """The chained job is the soup job (launch/soup_job.py): after ALL elements, one soup of
    the three runs' final checkpoints (tests/test_soup_workflow.py has more)."""
    sub = scenario(scenarios, "sweep")
    train, chained = sub.jobs[:3], sub.jobs[3]
    assert [j["array_index"] for j in train] == [0, 1, 2]
    array_id = train[0]["job_id"].split("_")[0]
    assert [j["job_id"] for j in train] == [f"{array_id}_{i}" for i in range(3)]
    assert chained["kind"] == "soup" and chained["dependency"] == f"afterok:{array_id}"
    assert sub.facts["states"] == ["COMPLETED"] * 4
    (written,) = task_results(sub, chained["job_id"], tasks=1)
    assert written == str(sub.run_dir / "soups" / "soup")
    record = sub.run_dir / "soups" / "soup" / "SOUP.json"
    assert record.stat().st_mtime >= max(_final_commit_times(sub))  # after ALL elements
    ingredients = json.loads(record.read_text())["ingredients"]
    assert sorted(i["step"] for i in ingredients) == [20, 20, 20]
    assert sorted(i["run"] for i in ingredients) == sorted(j["run_dir"] for j in train)
    for i, record in enumerate(train):
        assert Path(record["run_dir"]).name == f"{i}-run.seed={i}"
        assert (
            json.loads((Path(record["run_dir"]) / "jobs.json").read_text())[0]["array_index"] == i
        )


def _final_commit_times(sub: Submitted) -> list[float]:
    times = []
    for record in sub.jobs[:3]:
        latest = catalog.scan(Store(record["run_dir"])).latest()
        assert latest is not None
        times.append(latest.manifest.created_at)
    return times


def test_a_failed_element_never_runs_the_chained_job(scenarios: Any) -> None:
    sub = scenario(scenarios, "sweepfail")
    # --kill-on-invalid-dep: the chained job is cancelled, never left pending forever
    assert sub.facts["states"] == ["COMPLETED", "FAILED", "CANCELLED"]
    assert "task.hidden" in sub.log(job_id=sub.jobs[1]["job_id"])
    assert not list(sub.run_dir.rglob("model.safetensors"))
    assert not list(sub.run_dir.rglob("SOUP.json"))
    assert not (sub.log_dir / f"{sub.jobs[2]['job_id']}_0_result.pkl").exists()
