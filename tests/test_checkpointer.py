"""The Checkpointer in one process: async saves, failures, fallback, races, garbage, retention."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from orchestrator.checkpoint import catalog, dcp_io
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.commit import Attempt, NonceCommit, RenameCommit, commit_strategy
from orchestrator.checkpoint.layout import MANIFEST_NAME
from orchestrator.checkpoint.retention import KeepBest, RetentionPolicy
from orchestrator.errors import CheckpointCorrupt, CheckpointError
from orchestrator.state import ModelAndOptimizer, RNGState
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same


class GatedStore(Store):
    """A real Store whose manifest writes wait for a gate (or fail), to hold a commit open."""

    def __init__(
        self, url: str, gate: threading.Event | threading.Barrier | None = None, fail: bool = False
    ) -> None:
        super().__init__(url)
        self.gate, self.fail = gate, fail

    def write_bytes(self, rel: str, data: bytes, *, create_only: bool = False) -> None:
        if rel.endswith(MANIFEST_NAME):
            if self.fail:
                raise OSError("injected: disk on fire")
            if isinstance(self.gate, threading.Barrier):
                self.gate.wait(timeout=60)
            elif self.gate is not None:
                assert self.gate.wait(timeout=60)
        super().write_bytes(rel, data, create_only=create_only)


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _train(model: nn.Module, optim: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()


def _checkpointer(
    store: Store, model: nn.Module, optim: torch.optim.Optimizer, **kw
) -> Checkpointer:
    ckpt = Checkpointer(store, **kw)
    ckpt.register("train", ModelAndOptimizer(model, optim))
    ckpt.register("rng", RNGState(), per_rank=True)
    return ckpt


def _fresh_restore(url: str, **kw) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    model, optim = _model()
    with torch.no_grad():
        model[0].weight.add_(1.0)  # differs from anything saved
    ckpt = _checkpointer(Store(url), model, optim)
    return model, optim, ckpt.restore(**kw)


def test_async_save_stages_then_commits_the_state_of_the_save_step(tmp_path: Path) -> None:
    gate = threading.Event()
    model, optim = _model()
    _train(model, optim, 2)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = _checkpointer(GatedStore(str(tmp_path), gate), model, optim, async_save=True)
    ckpt.save(2)
    _train(model, optim, 3)  # training continues while the save is held open
    assert catalog.scan(Store(str(tmp_path))).committed == [], "not committed before the gate opens"
    gate.set()
    info = ckpt.wait()
    assert info is not None and info.step == 2
    ckpt.close()
    restored, _, _ = _fresh_restore(str(tmp_path))
    assert_same(at_save, restored.state_dict())
    assert not torch.equal(restored[0].weight, model[0].weight)


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    gate = threading.Event()
    model, optim = _model()
    ckpt = _checkpointer(GatedStore(str(tmp_path), gate), model, optim, async_save=True)
    ckpt.save(1)
    second = threading.Thread(target=ckpt.save, args=(2,))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive(), "the second save waits for the first"
    gate.set()
    second.join(timeout=60)
    ckpt.close()
    assert [c.step for c in catalog.scan(Store(str(tmp_path))).committed] == [1, 2]


def test_background_failure_surfaces_at_next_save_and_at_close(tmp_path: Path) -> None:
    model, optim = _model()
    ckpt = _checkpointer(GatedStore(str(tmp_path), fail=True), model, optim, async_save=True)
    ckpt.save(1)  # returns: the failure happens in the background
    with pytest.raises(
        CheckpointError, match="step 1 not committed: OSError: injected: disk on fire"
    ):
        ckpt.save(2)  # raised before step 2 is staged: nothing new is in flight
    ckpt.save(3)
    with pytest.raises(CheckpointError, match="step 3 not committed"):
        ckpt.close()
    assert catalog.scan(Store(str(tmp_path))).committed == []


def test_sync_failure_raises_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    model, optim = _model()
    _checkpointer(Store(str(tmp_path)), model, optim).save(1)
    with pytest.raises(CheckpointError, match="step 2 not committed"):
        _checkpointer(GatedStore(str(tmp_path), fail=True), model, optim).save(2)
    assert [c.step for c in catalog.scan(Store(str(tmp_path))).committed] == [1]


def test_flipped_byte_falls_back_loudly_to_the_previous_checkpoint(tmp_path: Path, caplog) -> None:
    model, optim = _model()
    ckpt = _checkpointer(Store(str(tmp_path)), model, optim)
    _train(model, optim)
    ckpt.save(1)
    at_one = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, optim)
    ckpt.save(2)
    shard = next((tmp_path / "checkpoints/step-000000002").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        restored, _, info = _fresh_restore(str(tmp_path))
    assert info.step == 1
    assert_same(at_one, restored.state_dict())
    assert "step-000000002 FAILED verification" in caplog.text and shard.name in caplog.text
    with pytest.raises(CheckpointCorrupt, match=f"{shard.name}: checksum mismatch"):
        _fresh_restore(str(tmp_path), step=2)


def _flip_a_byte(step_dir: Path) -> Path:
    shard = next(step_dir.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard


def test_the_newest_checkpoint_is_checked_while_it_loads(tmp_path: Path, monkeypatch) -> None:
    """The small files (DCP's `.metadata`, unpickled by the load; the rank's state) are checked
    before the load starts; the shards' checksum pass runs on its own thread while the main one
    loads them (restoring.py), so their bytes come from disk once; the state is the saved one."""
    model, optim = _model()
    _train(model, optim)
    ckpt = _checkpointer(Store(str(tmp_path)), model, optim)
    ckpt.save(1)
    at_one = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[tuple[str, bool]] = []  # (what: the files checked or "load", on the main thread)
    verify, load_shards = catalog.verify, dcp_io.load_shards

    def on_main() -> bool:
        return threading.current_thread() is threading.main_thread()

    def spying(*args, names, **kwargs):
        seen.append((" ".join(sorted(names)), on_main()))
        return verify(*args, names=names, **kwargs)

    def loading(*args, **kwargs):
        seen.append(("load", on_main()))
        return load_shards(*args, **kwargs)

    monkeypatch.setattr(catalog, "verify", spying)
    monkeypatch.setattr(dcp_io, "load_shards", loading)
    restored, _, info = _fresh_restore(str(tmp_path))
    assert info.step == 1
    assert_same(at_one, restored.state_dict())
    assert seen[0] == (".metadata ranks/rank-00000.json", True)
    assert sorted(seen[1:]) == [("__0_0.distcp __0_optim.distcp", False), ("load", True)]


def test_no_verifying_checkpoint_refuses_to_start_over(tmp_path: Path) -> None:
    """Every committed checkpoint is bad: the restore raises with the fix instead of training
    from scratch on a state that holds part of the newest (it was loaded while checked)."""
    model, optim = _model()
    ckpt = _checkpointer(Store(str(tmp_path)), model, optim)
    for step in (1, 2):
        _train(model, optim)
        ckpt.save(step)
    for step in (1, 2):
        _flip_a_byte(tmp_path / f"checkpoints/step-{step:09d}")
    with pytest.raises(
        CheckpointCorrupt, match=r"none of the 2 committed checkpoint\(s\).*stockpot verify"
    ):
        _fresh_restore(str(tmp_path))


def test_size_check_runs_even_with_checksums_off(tmp_path: Path) -> None:
    model, optim = _model()
    ckpt = _checkpointer(Store(str(tmp_path)), model, optim)
    ckpt.save(1)
    ckpt.save(2)
    shard = next((tmp_path / "checkpoints/step-000000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    fresh = _checkpointer(Store(str(tmp_path)), *_model(), verify_checksums=False)
    assert fresh.restore().step == 1


def test_user_registered_state_and_hooks_round_trip(tmp_path: Path) -> None:
    class Counter:
        def __init__(self) -> None:
            self.n, self.history = 0, [0.0]

        def state_dict(self) -> dict:
            return {"n": self.n, "history": list(self.history), "t": torch.arange(3) * self.n}

        def load_state_dict(self, state: dict) -> None:
            self.n, self.history = state["n"], list(state["history"])

    saved: dict = {}
    counter, position = Counter(), {"index": 0}
    ckpt = Checkpointer(Store(str(tmp_path)))
    ckpt.register("counter", counter)
    ckpt.register("data", save=lambda: dict(position), load=saved.update, per_rank=True)
    counter.n, counter.history, position["index"] = 7, [0.5, 0.25], 1234
    ckpt.save(5)
    other = Counter()
    fresh = Checkpointer(Store(str(tmp_path)))
    fresh.register("counter", other)
    fresh.register("data", save=dict, load=saved.update, per_rank=True)
    assert fresh.restore().step == 5
    assert (other.n, other.history, saved) == (7, [0.5, 0.25], {"index": 1234})


def test_register_refuses_bad_names_and_arguments(tmp_path: Path) -> None:
    ckpt = Checkpointer(Store(str(tmp_path)))
    ckpt.register("a", RNGState())
    for name in ("a", "b.c", ""):
        with pytest.raises(ValueError, match="is empty, has a dot, or is taken"):
            ckpt.register(name, RNGState())
    with pytest.raises(TypeError, match="save= and load="):
        ckpt.register("x", save=dict)


def test_saving_a_committed_step_again_is_refused(tmp_path: Path) -> None:
    model, optim = _model()
    ckpt = _checkpointer(Store(str(tmp_path)), model, optim)
    ckpt.save(3)
    with pytest.raises(CheckpointError, match="step-000000003 is already committed"):
        ckpt.save(3)


def test_retention_keeps_newest_and_best(tmp_path: Path) -> None:
    model, optim = _model()
    policy = RetentionPolicy(keep_last=2, keep_best=KeepBest("eval/loss", "min", 1))
    ckpt = _checkpointer(Store(str(tmp_path)), model, optim, policy=policy)
    for step, loss in [(1, 5.0), (2, 0.5), (3, 4.0), (4, 3.0), (5, 2.0)]:
        ckpt.save(step, {"eval/loss": loss})
    ckpt.wait()  # retention runs in the background after each commit (upkeep.py)
    assert [c.step for c in catalog.scan(Store(str(tmp_path))).committed] == [2, 4, 5]
    assert catalog.scan(Store(str(tmp_path))).best("eval/loss").step == 2


class CountingStore(Store):
    """A real Store that counts the manifests read through it (one GET each on S3)."""

    manifest_reads = 0

    def read_bytes(self, rel: str) -> bytes:
        if rel.endswith(MANIFEST_NAME):
            CountingStore.manifest_reads += 1
        return super().read_bytes(rel)


def test_each_save_reads_only_its_own_manifest_however_many_are_kept(tmp_path: Path) -> None:
    """Retention plans after every commit over every kept checkpoint: their manifests are read
    once per Checkpointer, not once per save (20 kept would be 20 GETs a save on S3). A thinned
    manifest is read again, so its new weights_only flag is seen and it is thinned only once."""
    model, optim = _model()
    policy = RetentionPolicy(keep_last=2, keep_weights_every_steps=1)
    ckpt = _checkpointer(CountingStore(str(tmp_path)), model, optim, policy=policy)
    reads = []
    for step in range(1, 11):
        before = CountingStore.manifest_reads
        ckpt.save(step)
        ckpt.wait()  # and its retention, which runs in the background (upkeep.py)
        reads.append(CountingStore.manifest_reads - before)
    # The probe for a bad leftover at the new step, the new one, and the one the previous save
    # thinned (read again once); without the cache, save N read all N.
    assert max(reads) <= 3, reads
    found = catalog.scan(Store(str(tmp_path))).committed
    assert [c.step for c in found] == list(range(1, 11))
    assert [c.manifest.weights_only for c in found] == [True] * 8 + [False] * 2
    for info in found:
        assert catalog.verify(Store(str(tmp_path)).child(info.rel), info.manifest) == []


def test_keep_weights_improved_keeps_the_weights_of_improving_checkpoints(tmp_path: Path) -> None:
    """`checkpoint.keep_weights_improved` on real saves: each checkpoint that improved eval/loss
    keeps its weights (its optimizer files deleted, its manifest still naming only files that
    exist); the others go; resume still picks the newest full one."""
    model, optim = _model()
    policy = RetentionPolicy(keep_last=1, keep_weights_improved=("eval/loss",))
    ckpt = _checkpointer(Store(str(tmp_path)), model, optim, policy=policy)
    for step, loss in [(1, 0.9), (2, 0.95), (3, 0.8), (4, 0.85), (5, 0.99)]:
        _train(model, optim)
        ckpt.save(step, {"eval/loss": loss})
    ckpt.close()
    found = catalog.scan(Store(str(tmp_path))).committed
    assert [(c.step, c.manifest.weights_only) for c in found] == [(1, True), (3, True), (5, False)]
    for info in found:
        assert catalog.verify(Store(str(tmp_path)).child(info.rel), info.manifest) == []
    _, _, info = _fresh_restore(str(tmp_path))
    assert info is not None and info.step == 5


def test_garbage_from_an_interrupted_session_is_collected_at_the_next_save(tmp_path: Path) -> None:
    model, optim = _model()
    _checkpointer(Store(str(tmp_path)), model, optim).save(5)
    ck = tmp_path / "checkpoints"
    for name in (".tmp-step-000000006-deadbeef", "step-000000003", "step-000000009"):
        (ck / name).mkdir()
        (ck / name / "__0_0.distcp").write_bytes(b"partial")
    corrupt = ck / "step-000000001"
    corrupt.mkdir()
    (corrupt / MANIFEST_NAME).write_text(
        '{"format": "stockpot.checkpoint", "version": 1, "step": 1, '
        '"world_size": 1, "files": {"../x": {"size": 1, "checksum": "0"}}}'
    )
    scan = catalog.scan(Store(str(tmp_path)))
    assert [c.step for c in scan.committed] == [5]
    assert [rel for rel, _ in scan.corrupt] == ["checkpoints/step-000000001"]
    assert "escapes the checkpoint" in scan.corrupt[0][1]
    _checkpointer(Store(str(tmp_path)), model, optim).save(10)
    left = sorted(p.name for p in ck.iterdir())
    # temp dir and the uncommitted step older than the newest commit are gone; the uncommitted
    # newer one is left (it could belong to a writer still running); the corrupt one is never touched
    assert left == ["step-000000001", "step-000000005", "step-000000009", "step-000000010"]


def test_two_writers_race_to_commit_one_step_on_s3(s3_server, s3_bucket, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    url = f"{s3_bucket}/run"
    barrier = threading.Barrier(2)  # both reach the create-only manifest PUT together
    outcomes: list[object] = []

    def writer() -> None:
        model, optim = _model()
        try:
            _checkpointer(GatedStore(url, barrier), model, optim).save(7)
            outcomes.append("committed")
        except CheckpointError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert outcomes.count("committed") == 1
    (loser,) = [o for o in outcomes if o != "committed"]
    assert "another writer committed" in str(loser) and "step-000000007 first" in str(loser)
    (info,) = catalog.scan(Store(url)).committed
    assert catalog.verify(Store(url).child(info.rel), info.manifest) == []
    _, _, restored = _fresh_restore(url)
    assert restored.step == 7
    # the loser's attempt is garbage inside the committed step; the next session removes it
    assert len(Store(url).list(info.rel)) == 3
    model, optim = _model()
    _checkpointer(Store(url), model, optim).save(8)
    assert sorted(Store(url).list(info.rel)) == sorted([MANIFEST_NAME, info.manifest.data_dir])


def test_tampered_dcp_metadata_cannot_run_code(tmp_path: Path) -> None:
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    model, optim = _model()
    _checkpointer(Store(str(tmp_path)), model, optim).save(1)
    (tmp_path / "checkpoints/step-000000001/.metadata").write_bytes(pickle.dumps(Evil()))
    from orchestrator.checkpoint import dcp_io

    with pytest.raises(CheckpointCorrupt, match=r"refusing to load posix\.system"):
        dcp_io.read_metadata(Store(str(tmp_path)), "checkpoints/step-000000001")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_commit_protocol_for_a_single_process_writer(
    backend: str, tmp_path: Path, request, monkeypatch
) -> None:
    """What the soup writer does: prepare a dir, write files, commit with the record last."""
    url = str(tmp_path / "run")
    if backend == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_server").endpoint_url)
        url = f"{request.getfixturevalue('s3_bucket')}/run"
    store = Store(url)
    strategy = commit_strategy(store, "SOUP.json")
    assert isinstance(strategy, RenameCommit if backend == "local" else NonceCommit)
    attempt = strategy.prepare("soups/uniform")
    store.write_bytes(f"{attempt.write_rel}/model.safetensors", b"weights")
    assert not store.exists("soups/uniform/SOUP.json")
    record = {"data_dir": attempt.data_dir, "file": attempt.final_name("model.safetensors")}
    strategy.commit(attempt, json.dumps(record).encode())
    got = json.loads(store.read_bytes("soups/uniform/SOUP.json"))
    assert store.read_bytes(f"soups/uniform/{got['file']}") == b"weights"
    assert store.list("soups") == ["uniform"], "no temp dir left beside it"
    with pytest.raises(CheckpointError, match="soups/uniform is already committed"):
        strategy.prepare("soups/uniform")
    if backend == "s3":  # a second writer that prepared before the commit loses, loudly
        late = Attempt("soups/uniform", "soups/uniform/other", "other")
        store.write_bytes(f"{late.write_rel}/model.safetensors", b"other weights")
        with pytest.raises(CheckpointError, match="another writer committed"):
            strategy.commit(late, b"{}")
        removed = strategy.collect_garbage("soups", committed={"soups/uniform": attempt.data_dir})
        assert removed == ["soups/uniform/other"]
        assert sorted(store.list("soups/uniform")) == sorted(["SOUP.json", attempt.data_dir])
