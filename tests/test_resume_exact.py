"""Exact resume: real `stockpot run` jobs SIGKILLed at random steps end bit-identical.

The kills are SIGKILL to the whole job (spawner and both ranks), never a polite signal. After
each kill the run is started again and resumes from its newest committed checkpoint; at the end
its weights and optimizer state must equal an uninterrupted run's bit for bit, and every step's
loss (the last line per step in metrics.jsonl) must be the same. Training is deterministic, so
those hold for a run restarted from scratch too: each restart must also have resumed, from the
newest commit at its kill (`resumed` events in metrics.jsonl, "resumed from step N" in the log).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.format import load_flat, stored_items
from orchestrator.metrics import last_per_step, read_metrics
from orchestrator.storage import Store
from tests import runs
from tests.ckpt_helpers import assert_same, final_state
from tests.runs import REPO, STOCKPOT, losses, newest_step

MAX_STEPS = runs.REFERENCE_STEPS
EVERY = runs.REFERENCE_EVERY  # checkpoint.every_steps
BASE = runs.REFERENCE  # its uninterrupted runs: the session's `demo_reference` fixture


def stockpot_run(run_dir: Path, *overrides: str, log: Path, timeout: float = 300) -> int:
    return runs.stockpot_run([*BASE, f"run.dir={run_dir}", *overrides], log=log, timeout=timeout)


def resumable_copy(reference: Path, run_dir: Path) -> Path:
    """A copy of the reference run (its checkpoints, metrics and config) at `run_dir`, to
    resume: a run dir moved or copied elsewhere resumes like the original."""
    shutil.copytree(reference, run_dir)
    assert newest_step(run_dir) == MAX_STEPS
    return run_dir


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("ddp", ("trainer.parallel=ddp",)),
        ("fsdp", ("trainer.parallel=fsdp",)),
        ("ddp-async", ("trainer.parallel=ddp", "checkpoint.async_save=true")),
    ],
)
def test_killed_twice_ends_bit_identical(
    name: str, overrides: tuple[str, ...], tmp_path: Path, demo_reference
) -> None:
    ref = demo_reference(overrides[0].removeprefix("trainer.parallel="))
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    argv = [*BASE, f"run.dir={run_dir}", *overrides]
    at = runs.kill_at_random_steps(argv, run_dir, 2, random.Random(name), every=EVERY, log=log)
    assert len(at) == 2 and at[-1] < MAX_STEPS
    print(f"{name}: SIGKILLed with the newest commit at steps {at}, resumed each time")
    # Resumed from each kill's newest commit, not restarted from scratch (which would end
    # bit-identical too: training is deterministic).
    runs.assert_resumed_from(run_dir, log.read_text(), at)
    want_state = final_state(ref, MAX_STEPS)
    assert any(k.startswith("ema_9.model.") for k in want_state), "the EMA is compared too"
    assert_same(want_state, final_state(run_dir, MAX_STEPS))
    want, got = losses(ref), losses(run_dir)
    assert sorted(want) == list(range(1, MAX_STEPS + 1))
    assert got == want
    restarts = {rec.get("restart") for rec in read_metrics(Store(str(run_dir)))}
    assert restarts == {0}, "local runs have no Slurm restart count"


def test_world_size_two_to_one_continues_from_the_same_global_sample(
    tmp_path: Path, demo_reference
) -> None:
    run_dir = resumable_copy(demo_reference("ddp"), tmp_path / "run")
    log = tmp_path / "run.log"
    store = Store(str(run_dir))
    at_two = catalog.scan(store).latest()
    two = load_flat(store, at_two.data_rel, ["sampler.samples_seen", "train.model.0.weight"])
    assert (at_two.step, at_two.manifest.world_size) == (MAX_STEPS, 2)
    assert (
        stockpot_run(
            run_dir,
            f"trainer.max_steps={MAX_STEPS + 4}",
            "trainer.nproc=1",
            "trainer.batch_size=128",
            "resume.allow_config_change=true",
            log=log,
        )
        == 0
    )
    one = catalog.scan(store).latest()
    assert (one.step, one.manifest.world_size) == (MAX_STEPS + 4, 1)
    after = load_flat(store, one.data_rel, ["sampler.samples_seen"])
    # 2 ranks x 64 per step for MAX_STEPS steps, then 1 rank x 128 per step for 4 more
    assert two["sampler.samples_seen"] == MAX_STEPS * 128
    assert after["sampler.samples_seen"] == (MAX_STEPS + 4) * 128
    assert "resuming world size 1 from a checkpoint of world size 2" in log.read_text()


def test_two_rank_checkpoint_restores_model_and_optimizer_exactly_in_one_rank(
    demo_reference,
) -> None:
    from orchestrator.checkpoint.checkpointer import Checkpointer
    from orchestrator.state import ModelAndOptimizer
    from orchestrator.tasks import build_task

    run_dir = demo_reference("fsdp")  # read only: restore writes nothing
    store = Store(str(run_dir))
    task = build_task(
        "orchestrator.tasks.synthetic.SyntheticClassification", {"n_train": 4096, "n_eval": 512}
    )
    model = task.build_model()
    optim = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.01)
    ckpt = Checkpointer(store)
    ckpt.register("train", ModelAndOptimizer(model, optim))
    assert ckpt.restore().step == MAX_STEPS
    restored = _flatten({"train": ModelAndOptimizer(model, optim).state_dict()})
    saved = final_state(run_dir, step=MAX_STEPS)
    tensors = {
        k: v for k, v in saved.items() if isinstance(v, torch.Tensor) and k.startswith("train.")
    }
    assert tensors.keys() <= restored.keys() and len(tensors) > 10
    for key, value in tensors.items():
        assert torch.equal(value, restored[key]), key


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {
            k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()
        }
    if isinstance(tree, list):
        return {
            k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}{i}.").items()
        }
    return {prefix[:-1]: tree}


def final_state_at(store: Store, step: int) -> dict:
    (info,) = [c for c in catalog.scan(store).committed if c.step == step]
    keys = list(stored_items(store, info.data_rel))
    return load_flat(store, info.data_rel, [k for k in keys if k.startswith("train.model.")])


def test_config_drift_is_refused_with_a_diff_but_max_steps_may_change(
    tmp_path: Path, demo_reference
) -> None:
    run_dir = resumable_copy(demo_reference("ddp"), tmp_path / "run")
    log = tmp_path / "run.log"
    more = f"trainer.max_steps={MAX_STEPS + 4}"
    code = stockpot_run(run_dir, more, "optim.lr=0.001", log=log)
    assert code == 2
    assert (
        f"config changed since checkpoint step {MAX_STEPS}: optim.lr: 0.003 -> 0.001"
        in log.read_text()
    )
    assert "set resume.allow_config_change=true" in log.read_text()
    assert newest_step(run_dir) == MAX_STEPS
    assert stockpot_run(run_dir, more, log=log) == 0
    assert newest_step(run_dir) == MAX_STEPS + 4
    # the refused attempt did not count
    runs.assert_resumed_from(run_dir, log.read_text(), [MAX_STEPS])


def test_init_from_starts_from_the_pretrained_weights(tmp_path: Path, demo_reference) -> None:
    from orchestrator.runner import init_from
    from orchestrator.tasks import build_task

    pre = demo_reference("ddp")  # read only: init_from reads its newest weights
    log = tmp_path / "run.log"
    pre_weights = final_state_at(Store(str(pre)), MAX_STEPS)
    task = build_task("orchestrator.tasks.synthetic.SyntheticClassification", {"split": "finetune"})
    torch.manual_seed(123)
    model = task.build_model()  # what a fine-tune run builds before training
    init_from(model, str(pre), Store(str(tmp_path / "finetune")))
    assert_same({f"train.model.{k}": v for k, v in model.state_dict().items()}, pre_weights)
    # the real fine-tune run starts from it, trains, and keeps its own checkpoints from then on
    fine = tmp_path / "finetune"
    assert (
        stockpot_run(
            fine, "trainer.max_steps=4", f"model.init_from={pre}", "task.split=finetune", log=log
        )
        == 0
    )
    assert "initialised from" in log.read_text() and newest_step(fine) == 4
    bad = tmp_path / "bad"
    code = stockpot_run(
        bad, "trainer.max_steps=2", f"model.init_from={pre}", "task.hidden=48", log=log
    )
    assert code == 2
    assert (
        "parameter '0.weight' has shape (64, 32) there but (48, 32) in this model"
        in log.read_text()
    )
    assert newest_step(pre) == MAX_STEPS  # the pretrained run was only read


def test_run_on_s3_resumes_from_s3(s3_server, s3_bucket, tmp_path: Path, monkeypatch) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    url = f"{s3_bucket}/runs/demo"

    def run(steps: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [STOCKPOT, "run", "configs/demo-s3.yaml", *BASE[1:], f"run.dir={url}",
             f"trainer.max_steps={steps}", "checkpoint.keep_last=2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    first = run(8)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(12)
    assert second.returncode == 0, second.stderr[-3000:]
    runs.assert_resumed_from(url, second.stderr, [8])
    store = Store(url)
    assert [c.step for c in catalog.scan(store).committed] == [8, 12]
    assert sorted(losses_at(store)) == list(range(1, 13))
    assert store.read_bytes("config.yaml").startswith(b"# stockpot resolved config; hash ")


def losses_at(store: Store) -> dict[int, float]:
    return last_per_step(read_metrics(store), "loss")
