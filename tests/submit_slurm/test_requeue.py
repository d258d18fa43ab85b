"""`stockpot submit` of the 2-rank demo on the real Slurm cluster: it completes; interrupted by
`scontrol requeue`, USR2, a higher-priority job or a SIGKILL, it requeues and resumes from its
newest committed checkpoint and ends bit-identical to the uninterrupted run; and
launcher.max_requeues stops it for good."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same, final_state
from tests.submit_slurm.scenarios import (
    CRASH_STEP,
    FIGURES,
    MAX_STEPS,
    TRIGGER_STEP,
    Submitted,
    metrics,
    newest_step,
    scenario,
    status_json,
    stop_line,
    task_results,
)

# The scenarios share one node and queue behind each other: their package fixture may take
# longer than the suite's per-test limit on a slow machine; each wait stays bounded by WAIT_S.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]


def test_submitted_demo_completes_on_both_ranks(scenarios: Any) -> None:
    sub = scenario(scenarios, "plain")
    assert sub.facts["state"] == "COMPLETED", sub.log()[-3000:]
    results = task_results(sub)  # returns: the ranks left after writing their pickles
    assert [(r["rank"], r["finished"], r["step"], r["restart"]) for r in results] == [
        (0, True, MAX_STEPS, 0),
        (1, True, MAX_STEPS, 0),
    ]
    latest = catalog.scan(Store(str(sub.run_dir))).latest()
    assert latest is not None and latest.manifest.world_size == 2
    assert {m["restart"] for m in metrics(sub)} == {0}
    report = sub.facts["status"]
    assert report["restarts"] == 0
    assert [(j["job_id"], j["kind"], j["state"]) for j in report["jobs"]] == [
        (sub.job_id, "train", "COMPLETED")
    ]


@pytest.mark.parametrize("name", ["requeue", "usr2", "high", "kill"])
def test_interrupted_job_requeues_and_resumes_bit_identical(scenarios: Any, name: str) -> None:
    sub = scenario(scenarios, name)
    assert sub.facts["state"] == "COMPLETED", sub.log()[-3000:]
    lines = metrics(sub)
    resumed = [m for m in lines if m.get("event") == "resumed"]
    assert [(m["restart"], m["resumes"]) for m in resumed] == [(1, 1)], resumed
    if name == "kill":  # no warning: back to the newest checkpoint committed before the kill
        assert resumed[0]["step"] == sub.facts["committed_at_kill"] >= TRIGGER_STEP
    else:  # the stop saved the very step it stopped at
        signal_name, step, save_s = stop_line(sub)
        assert signal_name == ("SIGTERM" if name == "requeue" else "SIGUSR2")
        assert resumed[0]["step"] == step
        FIGURES.setdefault(name, {})["signal->commit"] = save_s
    _record_requeue_figure(sub, name, lines)
    assert [(r["rank"], r["finished"], r["restart"]) for r in task_results(sub)] == [
        (0, True, 1),
        (1, True, 1),
    ]
    assert status_json(sub)["restarts"] == 1
    reference = scenario(scenarios, "plain")
    assert_same(
        final_state(sub.run_dir, MAX_STEPS),
        final_state(reference.run_dir, MAX_STEPS),
        f"{name} vs plain",
    )
    if name == "high":
        assert sub.facts["high_out"].read_text().strip() == "high ran"
    if name == "usr2":  # the ranks had no scontrol: the batch shell's supervisor requeued, once
        out = sub.log(stream="out")
        assert "NO-SCONTROL" in out and out.count("; requeued job") == 1, out[-3000:]


def test_a_killed_rank_is_restarted_inside_the_allocation_bit_identical(scenarios: Any) -> None:
    sub = scenario(scenarios, "crash")
    assert sub.facts["state"] == "COMPLETED", sub.log()[-3000:]
    assert sub.facts["fault"] == f"kill rank 1 step {CRASH_STEP}\n"  # it landed, once
    out = sub.log(stream="out")
    assert out.count("transient failure: starting every rank again") == 1, out[-3000:]
    assert "; requeued job" not in out  # inside the allocation: no requeue
    resumed = [m for m in metrics(sub) if m.get("event") == "resumed"]
    assert [(m["restart"], m["resumes"]) for m in resumed] == [(0, 1)], resumed
    assert resumed[0]["step"] == CRASH_STEP // 10 * 10  # the newest commit before the kill
    (job,) = sub.facts["status"]["jobs"]
    assert [(x["life"], x["class"]) for x in job["lives"]] == [
        (f"{sub.job_id}-0-0", "transient"),
        (f"{sub.job_id}-0-1", "finished"),
    ]
    assert "rank(s) 1 left no record" in job["lives"][0]["cause"]
    reference = scenario(scenarios, "plain")
    assert_same(final_state(sub.run_dir, MAX_STEPS), final_state(reference.run_dir, MAX_STEPS))


def _record_requeue_figure(sub: Submitted, name: str, lines: list[dict[str, Any]]) -> None:
    requeued_at = sub.facts["requeued_at"]
    if requeued_at != requeued_at:  # nan: the supervisor requeued it; its log says when
        m = re.search(r"stockpot supervisor: (\S+ \S+) .*; requeued job", sub.log(stream="out"))
        assert m, sub.log(stream="out")[-3000:]
        requeued_at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    first_step = min(m["time"] for m in lines if m["restart"] == 1 and "loss" in m)
    FIGURES.setdefault(name, {})["requeue->first logged step"] = first_step - requeued_at


def test_max_requeues_is_honoured(scenarios: Any) -> None:
    sub = scenario(scenarios, "budget")
    assert sub.facts["state"] == "FAILED", sub.log()[-3000:]
    assert max(m["restart"] for m in metrics(sub)) == 1
    out = sub.log(stream="out")
    assert "not requeueing: requeued 1 times already (launcher.max_requeues=1)" in out, out
    assert newest_step(sub.run_dir) < MAX_STEPS  # stopped for good, at a committed step
    results = task_results(sub)  # both ranks stopped after saving: resumable by hand
    assert [(r["finished"], r["step"]) for r in results] == [(False, newest_step(sub.run_dir))] * 2
