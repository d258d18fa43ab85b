"""SIGKILL real ranks at random instants while they save: committed checkpoints stay whole.

Each trial starts 2 ranks that save every step (saving dominates their time), waits for a new
commit, then SIGKILLs one rank (alternately the committing rank 0 and rank 1) at a random
moment and the other shortly after, as a dying node and Slurm would. After every kill: every
committed checkpoint verifies, nothing uncommitted is reported as a checkpoint, and the next run
resumes from the newest one.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.layout import TMP_PREFIX, parse_step_dirname
from orchestrator.storage import Store
from tests.ranks import kill_all, run_ranks, start_ranks

WORKER = "tests.workers.ckpt_worker"
TRIALS = {"local": 10, "s3": 5}
WIDTH = {"local": "768", "s3": "256"}  # local saves ~15 MB; moto is slow, keep S3 saves smaller


def _newest_step(store: Store) -> int:
    latest = catalog.scan(store).latest()
    return latest.step if latest else 0


def _wait_for_commit_after(store: Store, step: int, procs, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _newest_step(store) > step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: {[p.poll() for p in procs]}")
        time.sleep(0.05)
    raise AssertionError("no new commit in time")


def _check_whole(store: Store) -> catalog.Scan:
    scan = catalog.scan(store)
    assert scan.corrupt == []
    for info in scan.committed:
        assert catalog.verify(store.child(info.rel), info.manifest) == [], info.rel
    committed_rels = {c.rel for c in scan.committed}
    assert not committed_rels & set(scan.leftovers)
    return scan


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_at_random_points_during_save(
    backend: str, tmp_path: Path, request, monkeypatch
) -> None:
    env: dict[str, str] = {}
    url = str(tmp_path / "run")
    if backend == "s3":
        server = request.getfixturevalue("s3_server")
        url = f"{request.getfixturevalue('s3_bucket')}/run"
        env = {"AWS_ENDPOINT_URL": server.endpoint_url}
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    store = Store(url)
    rng = random.Random(20261122)
    args = [
        url,
        "--parallel",
        "fsdp",
        "--width",
        WIDTH[backend],
        "--steps",
        "1000000",
        "--save-every",
        "1",
        "--keep-last",
        "2",
        "--restore",
    ]
    mid_save = 0
    for trial in range(TRIALS[backend]):
        before = _newest_step(store)
        procs = start_ranks(WORKER, args, 2, env=env, log_dir=tmp_path)
        try:
            _wait_for_commit_after(store, before, procs)
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(procs[trial % 2].pid, signal.SIGKILL)  # rank 0 commits; rank 1 only writes
            time.sleep(rng.uniform(0.0, 0.2))
        finally:
            kill_all(procs)
        scan = _check_whole(store)
        assert scan.latest() is not None and scan.latest().step > before, "resumed and progressed"
        # a kill inside a save leaves an uncommitted dir, or (S3) a stale attempt in a step dir
        stale = any(len(store.list(c.rel)) > 2 for c in scan.committed) if store.is_s3 else False
        mid_save += bool(scan.leftovers) or stale
    # The next save session resumes from the newest commit and cleans up what the kills left.
    newest = _newest_step(store)
    run_ranks(
        WORKER,
        [*args[:-5], "--steps", "1", "--save-every", "1", "--keep-last", "2", "--restore"],
        2,
        env=env,
        log_dir=tmp_path,
        timeout=180,
    )
    scan = _check_whole(store)
    assert scan.latest().step == newest + 1
    for rel in scan.leftovers:
        name = rel.rsplit("/", 1)[-1]
        assert not name.startswith(TMP_PREFIX), rel
        assert (parse_step_dirname(name) or 0) > newest + 1, (
            f"{rel} is older than the newest commit"
        )
    print(
        f"{backend}: {TRIALS[backend]} kill trials, {mid_save} left a partial save behind; "
        f"newest step {newest + 1}"
    )
