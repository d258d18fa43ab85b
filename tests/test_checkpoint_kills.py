"""SIGKILL real ranks in the middle of a save: committed checkpoints stay whole.

Each trial starts 2 ranks that save every step, waits for a new commit, then watches the storage
for the next save in progress and SIGKILLs one rank (alternately the committing rank 0 and rank
1) at a chosen point of it, and the other a moment after, as a dying node and Slurm would. The
points rotate: as soon as the save's directory appears, once its first shard file exists, once
both ranks' shards exist (just before the commit). After every kill: the save was caught
unfinished (it left an uncommitted directory), every committed checkpoint verifies, nothing
uncommitted is reported as a checkpoint, and the next run resumes from the newest one.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.format import (
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    TMP_PREFIX,
    parse_step_dirname,
)
from orchestrator.storage import Store
from tests.ranks import kill_all, run_ranks, start_ranks

WORKER = "tests.workers.ckpt_worker"
TRIALS = {"local": 6, "s3": 4}  # each kill point at least once per backend; `make chaos`: many
WIDTH = {"local": "768", "s3": "256"}  # local saves ~15 MB; moto is slow, keep S3 saves smaller
# Kill once the save in progress holds this many shard files (DCP writes one per rank).
KILL_AT_SHARDS = (0, 1, 2)
SHARD_SUFFIX = ".distcp"
# A trial may miss (the save committing between the look and the kill) now and then.
MAY_MISS = 1


class LocalSaves:
    """Saves in progress on local disk: `checkpoints/.tmp-step-*` directories, renamed at commit."""

    def __init__(self, run_dir: str) -> None:
        self.root = Path(run_dir) / CHECKPOINTS_DIR

    def in_progress(self) -> list[int]:
        """Shard files written so far, per save in progress."""
        if not self.root.is_dir():
            return []
        return [
            sum(f.endswith(SHARD_SUFFIX) for _, _, files in os.walk(d) for f in files)
            for d in self.root.iterdir()
            if d.name.startswith(TMP_PREFIX)
        ]


class S3Saves:
    """Saves in progress on S3: step prefixes with objects but no MANIFEST.json, above the
    newest commit (a commit is the create-only PUT of that manifest)."""

    def __init__(self, url: str, endpoint_url: str) -> None:
        import boto3

        where = urlparse(url)
        self.bucket, self.prefix = where.netloc, f"{where.path.strip('/')}/{CHECKPOINTS_DIR}/"
        self.client = boto3.client("s3", endpoint_url=endpoint_url)

    def in_progress(self) -> list[int]:
        keys: dict[str, list[str]] = {}
        pages = self.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                step_dir, _, rest = obj["Key"].removeprefix(self.prefix).partition("/")
                keys.setdefault(step_dir, []).append(rest)
        steps = {d: parse_step_dirname(d) for d in keys}
        committed = [s for d, s in steps.items() if s is not None and MANIFEST_NAME in keys[d]]
        newest = max(committed, default=-1)
        return [
            sum(k.endswith(SHARD_SUFFIX) for k in keys[d])
            for d, s in steps.items()
            if s is not None and s > newest and MANIFEST_NAME not in keys[d]
        ]


def _newest_step(store: Store) -> int:
    latest = catalog.scan(store).latest()
    return latest.step if latest else 0


def _wait(ok, procs, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: {[p.poll() for p in procs]}")
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.002)


def _kill_mid_save(procs, store: Store, saves, before: int, shards: int, first: int) -> None:
    """SIGKILL rank `first` once a save in progress holds `shards` shard files."""
    # After a commit of its own the run has collected the last trial's leftovers, so any save
    # seen in progress from then on is a live one.
    _wait(lambda: _newest_step(store) > before, procs, "new commit")
    _wait(lambda: any(n >= shards for n in saves.in_progress()), procs, "save in progress")
    os.kill(procs[first].pid, signal.SIGKILL)  # rank 0 commits; rank 1 only writes


def _check_whole(store: Store) -> catalog.Scan:
    scan = catalog.scan(store)
    assert scan.corrupt == []
    for info in scan.committed:
        assert catalog.verify(store.child(info.rel), info.manifest) == [], info.rel
    committed_rels = {c.rel for c in scan.committed}
    assert not committed_rels & set(scan.leftovers)
    return scan


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_in_the_middle_of_saves(backend: str, tmp_path: Path, request, monkeypatch) -> None:
    env: dict[str, str] = {}
    url = str(tmp_path / "run")
    saves: LocalSaves | S3Saves = LocalSaves(url)
    if backend == "s3":
        server = request.getfixturevalue("s3_server")
        url = f"{request.getfixturevalue('s3_bucket')}/run"
        env = {"AWS_ENDPOINT_URL": server.endpoint_url}
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        saves = S3Saves(url, server.endpoint_url)
    store = Store(url)
    rng = random.Random(20261122)
    args = [url, "--parallel", "fsdp", "--width", WIDTH[backend], "--steps", "1000000",
            "--save-every", "1", "--keep-last", "2", "--restore"]  # fmt: skip
    landed: Counter[int] = Counter()
    for trial in range(TRIALS[backend]):
        shards = KILL_AT_SHARDS[trial % len(KILL_AT_SHARDS)]
        before = _newest_step(store)
        procs = start_ranks(WORKER, args, 2, env=env, log_dir=tmp_path)
        try:
            _kill_mid_save(procs, store, saves, before, shards, first=trial % 2)
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            kill_all(procs)
        landed[shards] += bool(saves.in_progress())  # killed before that save committed
        _check_whole(store)
        assert _newest_step(store) > before, "resumed and progressed"
    print(f"{backend}: {TRIALS[backend]} kills; caught mid-save, by shards written: {landed}")
    assert sum(landed.values()) >= TRIALS[backend] - MAY_MISS, landed
    assert all(landed[n] for n in KILL_AT_SHARDS), f"every kill point was hit: {landed}"
    # The next save session resumes from the newest commit and cleans up what the kills left.
    newest = _newest_step(store)
    run_ranks(WORKER, [*args[:5], "--steps", "1", *args[7:]], 2, env=env, log_dir=tmp_path)
    scan = _check_whole(store)
    assert _newest_step(store) == newest + 1
    for rel in scan.leftovers:
        name = rel.rsplit("/", 1)[-1]
        assert not name.startswith(TMP_PREFIX), rel
        assert (parse_step_dirname(name) or 0) > newest + 1, (
            f"{rel} is older than the newest commit"
        )
