"""Sharded save/load with real gloo ranks as real processes, on local disk and on real S3."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same, load_dump
from tests.ranks import run_ranks

WORKER = "tests.workers.ckpt_worker"


@pytest.fixture(params=["local", "s3"])
def run_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, dict[str, str]]:
    """(run dir URL, env for the ranks) on each backend; this process gets the same env."""
    if request.param == "local":
        return str(tmp_path / "run"), {}
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    return f"{bucket}/run", {"AWS_ENDPOINT_URL": server.endpoint_url}


def _run(run: str, env: dict[str, str], log: Path, nproc: int, *args: str) -> None:
    run_ranks(WORKER, [run, *args], nproc, env=env, log_dir=log, timeout=240)


def _save_by_two(run: str, env: dict[str, str], log: Path, parallel: str) -> Path:
    """2 ranks under `parallel` train 3 steps and save; the full state they saved, dumped."""
    dump = log / f"saved-{parallel}.pt"
    _run(run, env, log, 2, "--parallel", parallel, "--steps", "3", "--dump", str(dump))
    return dump


@pytest.fixture(scope="module")
def saved_by_two(tmp_path_factory: pytest.TempPathFactory):
    """saved_by_two(parallel) -> (run dir, dump): `_save_by_two` on local disk, once for the
    module; the tests that restore it with 2 ranks, with 1, or in this process only read it."""
    root = tmp_path_factory.mktemp("saved-by-two")
    made: dict[str, tuple[str, Path]] = {}

    def get(parallel: str) -> tuple[str, Path]:
        if parallel not in made:
            run = str(root / parallel)
            made[parallel] = run, _save_by_two(run, {}, root, parallel)
        return made[parallel]

    return get


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_round_trip_is_bit_identical(
    run_url, parallel: str, tmp_path: Path, saved_by_two
) -> None:
    run, env = run_url
    if run.startswith("s3://"):
        saved = _save_by_two(run, env, tmp_path, parallel)
    else:
        run, saved = saved_by_two(parallel)
    _run(run, env, tmp_path, 2, "--parallel", parallel, "--steps", "0", "--restore",
         "--dump", str(tmp_path / "b.pt"))  # fmt: skip
    assert_same(load_dump(saved), load_dump(tmp_path / "b.pt"))
    (info,) = catalog.scan(Store(run)).committed
    assert (info.step, info.manifest.world_size, info.manifest.parallel) == (3, 2, parallel)
    shards = [n for n in info.manifest.files if n.endswith("_0.distcp")]  # model parts
    assert len(shards) == 2, "each rank wrote its own shard"


def test_async_two_rank_round_trip(run_url, tmp_path: Path) -> None:
    run, env = run_url
    _run(
        run,
        env,
        tmp_path,
        2,
        "--steps",
        "4",
        "--save-every",
        "2",
        "--async-save",
        "--dump",
        str(tmp_path / "a.pt"),
    )
    _run(run, env, tmp_path, 2, "--steps", "0", "--restore", "--dump", str(tmp_path / "b.pt"))
    assert_same(load_dump(tmp_path / "a.pt"), load_dump(tmp_path / "b.pt"))
    assert [c.step for c in catalog.scan(Store(run)).committed] == [2, 4]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_async_save_written_while_training_goes_on_holds_its_step(
    parallel: str, tmp_path: Path
) -> None:
    """Writes crawl, so each background save is still being written at the next optimizer
    steps (which copy what is left, snapshot.py): checkpoint 2 is still the state after step 2."""
    run = str(tmp_path / "run")
    common = ("--parallel", parallel, "--width", "128")
    _run(run, {}, tmp_path, 2, *common, "--steps", "6", "--save-every", "2", "--async-save",
         "--slow-writes", "--dump", str(tmp_path / "at2.pt"), "--dump-at", "2")  # fmt: skip
    _run(run, {}, tmp_path, 2, *common, "--steps", "0", "--restore", "--restore-step", "2",
         "--dump", str(tmp_path / "restored.pt"))  # fmt: skip
    assert_same(load_dump(tmp_path / "at2.pt"), load_dump(tmp_path / "restored.pt"))
    assert [c.step for c in catalog.scan(Store(run)).committed] == [2, 4, 6]


def test_a_bad_file_found_by_another_rank_falls_back_on_every_rank(tmp_path: Path) -> None:
    """A flipped byte in one file (one rank 1 would check in a split pass, catalog.share; its
    load hashes what it reads) makes every rank skip that checkpoint and load the previous one."""
    run = str(tmp_path / "run")
    _run(run, {}, tmp_path, 2, "--steps", "4", "--save-every", "2",
         "--dump", str(tmp_path / "at2.pt"), "--dump-at", "2")  # fmt: skip
    newest = catalog.scan(Store(run)).latest()
    assert newest is not None and newest.step == 4
    theirs = sorted(catalog.share(newest.manifest, 1, 2))
    assert theirs and not set(theirs) & catalog.share(newest.manifest, 0, 2)
    victim = Path(run) / newest.rel / theirs[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    _run(run, {}, tmp_path, 2, "--steps", "0", "--restore", "--dump", str(tmp_path / "b.pt"))
    assert_same(load_dump(tmp_path / "at2.pt"), load_dump(tmp_path / "b.pt"))
    log = (tmp_path / "rank0.log").read_text()
    assert f"{newest.rel} FAILED verification" in log and theirs[0] in log, log[-2000:]


@pytest.mark.parametrize(
    ("saved_by", "loaded_by", "parallel"), [(2, 1, "fsdp"), (1, 2, "fsdp"), (2, 1, "ddp")]
)
def test_resharding_across_world_sizes(
    tmp_path: Path, saved_by: int, loaded_by: int, parallel: str, saved_by_two
) -> None:
    load_parallel = parallel if loaded_by > 1 else "none"
    if saved_by == 2:
        run, saved = saved_by_two(parallel)
    else:
        run, saved = str(tmp_path / "run"), tmp_path / "a.pt"
        _run(run, {}, tmp_path, 1, "--parallel", "none", "--steps", "2", "--dump", str(saved))
    _run(run, {}, tmp_path, loaded_by, "--parallel", load_parallel, "--steps", "0",
         "--restore", "--dump", str(tmp_path / "b.pt"))  # fmt: skip
    assert_same(load_dump(saved), load_dump(tmp_path / "b.pt"))


def test_loads_into_a_plain_module_in_this_process(saved_by_two) -> None:
    import torch

    from orchestrator.checkpoint.checkpointer import Checkpointer
    from orchestrator.state import ModelAndOptimizer
    from tests.workers.ckpt_worker import build_model

    run, saved = saved_by_two("fsdp")  # 2 ranks, FSDP2
    model = build_model(32)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ckpt = Checkpointer(Store(run))
    ckpt.register("train", ModelAndOptimizer(model))
    assert ckpt.restore().step == 3
    assert_same(load_dump(saved)["model"], model.state_dict())
