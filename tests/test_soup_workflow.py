"""Soups in the workflow: weights-only retention (the ingredients kept cheaply).

A run with keep_last=2 and keep_weights_every_steps holds optimizer state only for its newest 2
checkpoints; every kept one verifies; resume never picks a weights-only one; the soup engine
reads them; a real SIGKILL while optimizer state is being dropped leaves every manifest naming
only files that exist (and the next save's sweep removes what the kill left).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.format import MANIFEST_NAME, is_optimizer_file
from orchestrator.checkpoint.retention import Candidate, plan_retention
from orchestrator.config.checkpoint import CheckpointConfig, RetentionPolicy
from orchestrator.errors import CheckpointCorrupt
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store
from tests.fixtures.s3 import s3_storage

REPO = Path(__file__).resolve().parents[1]


def _checkpointer(url: str, **kw) -> tuple[Checkpointer, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    ckpt = Checkpointer(Store(url), **kw)
    ckpt.register("train", ModelAndOptimizer(model, optim))
    return ckpt, model, optim


def _train_and_save(ckpt: Checkpointer, model: nn.Module, optim, steps: range) -> None:
    for step in steps:
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()
        ckpt.save(step, {"eval/loss": 1.0 / step})
    ckpt.wait()  # retention runs in the background after each commit (upkeep.py)


def _names_only_existing(run: Path) -> None:
    """Every committed manifest names only files that exist, whole (sizes and checksums)."""
    store = Store(str(run))
    for info in catalog.scan(store).committed:
        assert catalog.verify(store.child(info.rel), info.manifest) == [], info.rel


def test_plan_thins_weights_rule_steps_and_keeps_full_ones_whole() -> None:
    cands = [Candidate(s, {}) for s in range(1, 9)]
    policy = RetentionPolicy(keep_last=2, keep_weights_every_steps=2)
    todo = plan_retention(cands, policy)
    assert todo.delete == [1, 3, 5] and todo.drop_optimizer == [2, 4, 6]
    # Already thinned ones are not thinned again; a protected step stays whole.
    cands = [Candidate(s, {}, weights_only=s in (2, 4)) for s in range(1, 9)]
    assert plan_retention(cands, policy, protected=(6,)).drop_optimizer == []


def test_keep_last_2_with_weights_every_2_holds_optimizer_state_only_for_the_last_2(
    tmp_path: Path,
) -> None:
    cfg = CheckpointConfig(keep_last=2, keep_weights_every_steps=2)
    ckpt, model, optim = _checkpointer(str(tmp_path), config=cfg)
    _train_and_save(ckpt, model, optim, range(1, 10))
    found = catalog.scan(Store(str(tmp_path))).committed
    assert [c.step for c in found] == [2, 4, 6, 8, 9]
    with_optim = {c.step for c in found if any(map(is_optimizer_file, c.manifest.files))}
    assert with_optim == {8, 9}
    assert {c.step for c in found if c.manifest.weights_only} == {2, 4, 6}
    on_disk = {p.parent.name for p in tmp_path.glob("checkpoints/*/__*_optim.distcp")}
    assert on_disk == {"step-000000008", "step-000000009"}
    _names_only_existing(tmp_path)
    thin = json.loads((tmp_path / "checkpoints/step-000000002" / MANIFEST_NAME).read_bytes())
    assert thin["version"] == 2 and thin["weights_only"] is True
    full = next(c for c in found if c.step == 9).manifest.total_bytes
    weights = next(c for c in found if c.step == 6).manifest.total_bytes
    assert weights < full / 2  # AdamW's two moments are twice the model

    shown = subprocess.run(
        [sys.executable, "-m", "launch", "status", str(tmp_path), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    kinds = {c["step"]: c["kind"] for c in json.loads(shown.stdout)["checkpoints"]}
    assert kinds == {2: "weights", 4: "weights", 6: "weights", 8: "full", 9: "full"}

    # Resume takes the newest full one; a weights-only one is refused by name, never loaded.
    fresh, _, _ = _checkpointer(str(tmp_path))
    assert fresh.restore().step == 9
    with pytest.raises(CheckpointCorrupt, match="weights-only"):
        _checkpointer(str(tmp_path))[0].restore(step=6)
    # After the full ones go too (a later run's retention), resume still never picks a thin one.
    for step in (8, 9):
        Store(str(tmp_path)).delete(f"checkpoints/step-{step:09d}", recursive=True)
    assert _checkpointer(str(tmp_path))[0].restore() is None


def test_soup_reads_weights_only_checkpoints(tmp_path: Path) -> None:
    cfg = CheckpointConfig(keep_last=1, keep_weights_every_steps=1)
    ckpt, model, optim = _checkpointer(str(tmp_path / "run"), config=cfg)
    _train_and_save(ckpt, model, optim, range(1, 5))
    thin = [c for c in catalog.scan(Store(str(tmp_path / "run"))).committed]
    assert [c.manifest.weights_only for c in thin] == [True, True, True, False]
    out = tmp_path / "soup"
    done = subprocess.run(
        [sys.executable, "-m", "launch", "soup", str(tmp_path / "run"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "SOUP.json").read_text())
    assert len(record["ingredients"]) == 4


_DROPPER = """
import os, sys, time
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.retention import drop_optimizer
from orchestrator.storage import Store

class Stalling(Store):
    # A real store that announces the phase it reached, then stalls there to be killed.
    def write_bytes(self, rel, data, *, create_only=False):
        if rel.endswith("MANIFEST.json") and sys.argv[2] == "manifest":
            self._stall()
        super().write_bytes(rel, data, create_only=create_only)

    def delete(self, rel, *, recursive=False):
        if sys.argv[2] == "deletes" and rel.endswith("optim.distcp"):
            self._stall()  # the new manifest is in place, the optimizer files not yet deleted
        super().delete(rel, recursive=recursive)

    def _stall(self):
        open(sys.argv[3], "w").close()
        time.sleep(120)

run = Stalling(sys.argv[1])
info = next(c for c in catalog.scan(run).committed if c.step == 1)
drop_optimizer(run, info)
"""


@pytest.mark.parametrize("phase", ["manifest", "deletes"])
def test_sigkill_while_dropping_optimizer_state_leaves_manifests_naming_existing_files(
    tmp_path: Path, phase: str
) -> None:
    run = tmp_path / "run"
    ckpt, model, optim = _checkpointer(str(run))
    _train_and_save(ckpt, model, optim, range(1, 3))
    reached = tmp_path / "reached"
    child = subprocess.Popen(
        [sys.executable, "-c", _DROPPER, str(run), phase, str(reached)], cwd=REPO
    )
    deadline = time.monotonic() + 120
    while not reached.exists():
        assert child.poll() is None and time.monotonic() < deadline, "dropper never got there"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL

    _names_only_existing(run)
    step1 = next(c for c in catalog.scan(Store(str(run))).committed if c.step == 1)
    # Killed before the new manifest: still whole and full. After it: weights only, and the
    # optimizer file the kill left unnamed is removed by the next job's first save (its sweep).
    assert step1.manifest.weights_only is (phase == "deletes")
    ckpt, model, optim = _checkpointer(str(run))
    _train_and_save(ckpt, model, optim, range(3, 4))
    left = sorted(p.name for p in (run / "checkpoints/step-000000001").iterdir())
    assert ("__0_optim.distcp" in left) is (phase == "manifest")
    _names_only_existing(run)


# --- the chained soup job on the real Slurm cluster ------------------------------------------

STOCKPOT = str(Path(sys.executable).parent / "stockpot")
SMALL = ["task.n_train=2048", "task.n_eval=512", "trainer.log_every=10", "trainer.eval_every=10"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
WAIT_S = 900  # a loaded 2-core machine: torch imports alone take ~50 s per job


def _squeue_state(job_id: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                         capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    states = sorted(set(out.stdout.split()))
    return ",".join(states) if out.returncode == 0 and states else None


def _wait_states(job_ids: list[str], on_running=None) -> dict[str, str]:
    """Each job's end state (polled together so none ends unseen); `on_running(job_id)` once
    when a job is first seen RUNNING."""
    ended: dict[str, str] = {}
    seen_running: set[str] = set()
    deadline = time.monotonic() + WAIT_S
    while len(ended) < len(job_ids):
        assert time.monotonic() < deadline, f"jobs {job_ids} did not end: {ended}"
        for job_id in job_ids:
            now = _squeue_state(job_id) if job_id not in ended else None
            if now == "RUNNING" and job_id not in seen_running and on_running is not None:
                seen_running.add(job_id)
                on_running(job_id)
            if now in TERMINAL:
                ended[job_id] = now
        time.sleep(0.5)
    return ended


def _submit(tmp_path: Path, name: str, *overrides: str, env: dict[str, str]) -> list[dict]:
    out = subprocess.run(
        [STOCKPOT, "submit", "configs/demo-slurm.yaml", *SMALL, "launcher.tasks_per_node=1",
         "trainer.max_steps=20", "checkpoint.every_steps=10", "soup.enabled=true",
         f"run.name={name}", f"launcher.log_dir={tmp_path / name / 'logs'}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "submitted chained job" in out.stdout, out.stdout
    return [line for line in out.stdout.splitlines() if "submitted" in line]


def _pretrain(tmp_path: Path) -> Path:
    pre = tmp_path / "pretrained"
    done = subprocess.run(
        [STOCKPOT, "run", "configs/demo.yaml", *SMALL, "trainer.max_steps=20", f"run.dir={pre}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return pre


@pytest.mark.slurm
def test_chained_soup_job_on_slurm_reads_s3_from_the_config(
    slurm_cluster, s3_server, s3_bucket, tmp_path: Path
) -> None:
    """An array of 3 fine-tunes (one pretrained start, a sweep over lr) on S3, each element in
    its own run dir, then the soup job (afterok on the array, after ALL elements) writes
    SOUP.json of their final checkpoints; storage.s3.endpoint_url is only in the config. The
    soup job is requeued once while it runs: it starts over and commits once. (A sweep with a
    failing element never runs its soup job: tests/submit_slurm/test_arrays.py.)"""
    import submitit

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    pre = _pretrain(tmp_path)
    url = f"{s3_bucket}/sweep"
    t0 = time.time()
    _submit(tmp_path, "soupsweep", f"run.dir={url}", f"storage.s3.endpoint_url={s3_server.endpoint_url}",
            f"model.init_from={pre}", "sweep.optim.lr=[0.02,0.05,0.1]", env=env)  # fmt: skip
    store = Store(url, s3_storage(s3_server.endpoint_url))
    jobs = json.loads(store.read_bytes("jobs.json"))
    soup_id = jobs[3]["job_id"]
    assert [j["kind"] for j in jobs] == ["train"] * 3 + ["soup"]
    assert jobs[3]["dependency"] == f"afterok:{jobs[0]['job_id'].split('_')[0]}"
    requeued: list[float] = []

    def requeue_the_soup_once(job_id: str) -> None:
        if job_id == soup_id:
            requeued.append(time.time() - t0)
            subprocess.run(["scontrol", "requeue", job_id], timeout=30, check=False)

    states = _wait_states([j["job_id"] for j in jobs], on_running=requeue_the_soup_once)
    total = time.time() - t0
    assert [states[j["job_id"]] for j in jobs] == ["COMPLETED"] * 4

    array_id = jobs[0]["job_id"].split("_")[0]
    assert [(j["job_id"], j["array_index"]) for j in jobs[:3]] == [
        (f"{array_id}_{i}", i) for i in range(3)
    ]
    for i, (job, lr) in enumerate(zip(jobs[:3], ("0.02", "0.05", "0.1"), strict=True)):
        assert job["run_dir"] == f"{url}/{i}-optim.lr={lr}"  # each element's own run dir
        own = json.loads(Store(job["run_dir"], store.options).read_bytes("jobs.json"))
        assert own[0]["array_index"] == i

    record = json.loads(store.read_bytes("soups/soup/SOUP.json"))
    assert len(record["ingredients"]) == 3 and all(i["in_soup"] for i in record["ingredients"])
    assert [i["step"] for i in record["ingredients"]] == [20, 20, 20]  # each element's final
    runs = sorted(i["run"] for i in record["ingredients"])
    assert runs == sorted(j["run_dir"] for j in jobs[:3])
    finals = [catalog.scan(Store(r, store.options)).latest().manifest.created_at for r in runs]
    assert record["created_at"] >= max(finals), "the soup ran after ALL elements"
    soup_job = submitit.SlurmJob(folder=tmp_path / "soupsweep" / "logs", job_id=soup_id)
    assert soup_job.result() == f"{url}/soups/soup"  # what the soup job returned
    assert requeued, "the soup job was never seen running"
    log = (tmp_path / "soupsweep" / "logs" / f"{soup_id}_0_log.err").read_text()
    trained = max(finals) - t0
    print(f"\nchained soup on Slurm: submit -> last element's final commit {trained:.0f} s; "
          f"soup job requeued at {requeued[0]:.0f} s; soup committed at {total:.0f} s (its own "
          f"work {record['timings']['total_s']:.1f} s); {log.count('committed uniform soup')} "
          "commit(s)")  # fmt: skip
    assert log.count("committed uniform soup") == 1
