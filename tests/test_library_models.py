"""Library models as users bring them: `transformers` GPT-2 (tied embeddings, dropout on) and
ResNet (BatchNorm), and a timm ResNet through a task of the user's own (`tests/vision_tasks.py`),
each under DDP and FSDP on 2 real gloo ranks (`stockpot run` processes).

Each trains, is SIGKILLed after a commit and resumed, and must end bit-identical to a run never
interrupted (weights, optimizer state, BatchNorm buffers with their int64 counters, every
step's loss); its export must load into the library's own class (`from_pretrained`) with the
tie intact and give the same outputs as the checkpoint; timm's, into `timm.create_model` from
that file (`checkpoint_path`, strict). Models are built from configs: no network. timm and
torchvision from PyPI import only beside the torch they were built for: the timm variants run on
torch 2.14.1 (`make test-torch`) and skip on the dev venv's 2.13.0.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.checkpoint import catalog
from orchestrator.metrics import last_per_step, read_metrics
from orchestrator.storage import Store
from orchestrator.tasks import build_task
from tests.ckpt_helpers import assert_same, final_state
from tests.vision_tasks import timm_problem, torch_version

transformers = pytest.importorskip("transformers")  # a dev dependency: `make test` installs it

REPO = Path(__file__).resolve().parents[1]
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
STEPS = 6
TASKS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "_target_": "orchestrator.tasks.hf.CausalLM",
        "seq_len": 16,
        "eval_fraction": 0.01,
        "config": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 16},
    },
    "resnet": {
        "_target_": "orchestrator.tasks.hf.ImageClassification",
        "image_size": 16,
        "n_train": 512,
        "n_eval": 48,
        "config": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
    },
    "timm": {  # resnet10t's layout (deep stem, a BasicBlock per stage), 80k parameters
        "_target_": "tests.vision_tasks.TimmClassification",
        "model": "resnet10t",
        "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8},
        "image_size": 32,
        "n_train": 512,
        "n_eval": 48,
    },
}
# PyPI's torchvision (timm needs it) is built for one torch: 0.29 for 2.14. On an older torch
# the timm variants cannot run and skip; from 2.14 on they must (the `vision` extra), so a venv
# that lacks it fails them (write_config) rather than passing by skipping.
NO_TIMM = timm_problem()
TIMM_TORCH = (2, 14)
SKIP_TIMM = pytest.mark.skipif(
    NO_TIMM is not None and torch_version() < TIMM_TORCH,
    reason=f"timm/torchvision from PyPI need torch 2.14, not {torch.__version__} "
    f"({NO_TIMM}): `make test-torch` runs these",
)
VARIANTS = [
    pytest.param(m, p, marks=[SKIP_TIMM] if m == "timm" else [])
    for m in TASKS
    for p in ("ddp", "fsdp")
]
TIE = ("train.model.transformer.wte.weight", "train.model.lm_head.weight")


def write_config(path: Path, model: str, parallel: str) -> Path:
    if model == "timm" and NO_TIMM is not None:
        pytest.fail(f"timm does not import beside torch {torch.__version__}: {NO_TIMM}; "
                    "pip install -e '.[vision]'")  # fmt: skip
    config = {
        "run": {"name": f"{model}-{parallel}", "seed": 0},
        "task": TASKS[model],
        "trainer": {
            "max_steps": STEPS, "nproc": 2, "parallel": parallel, "batch_size": 8,
            "log_every": 1, "eval_every": None,
        },
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
        "checkpoint": {"every_steps": 2, "keep_last": 2, "async_save": False},
    }  # fmt: skip
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def run(config: Path, run_dir: Path, *overrides: str, log: Path) -> int:
    with open(log, "ab") as out:
        return subprocess.run(
            [STOCKPOT, "run", str(config), f"run.dir={run_dir}", *overrides],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=400, check=False,
        ).returncode  # fmt: skip


def newest_step(run_dir: Path) -> int:
    latest = catalog.scan(Store(str(run_dir))).latest()
    return latest.step if latest else 0


def killed_then_resumed(config: Path, run_dir: Path, rng: random.Random, log: Path) -> int:
    """SIGKILL the whole job (spawner and ranks) a random moment after its first commit, before
    its last, then run it again to the end. Returns the step it resumed from.

    The job is frozen (SIGSTOP) before the kill, so the newest commit read then is the one the
    kill follows. One that had already committed its last step, or ended, within the random
    wait (six fast steps) is not a kill mid-run: it is started afresh with a shorter wait, at
    most three times."""
    window = 0.3
    for _attempt in range(3):
        shutil.rmtree(run_dir, ignore_errors=True)
        with open(log, "ab") as out:
            job = subprocess.Popen(
                [STOCKPOT, "run", str(config), f"run.dir={run_dir}"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 300
        while newest_step(run_dir) < 2 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, window))  # in the next steps, or inside the next save
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGSTOP)
            resumed_from = newest_step(run_dir)
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        else:  # it ran to the end within the wait
            assert job.returncode == 0, log.read_text()[-3000:]
            resumed_from = STEPS
        if resumed_from < STEPS:
            break
        window /= 4
    assert 2 <= resumed_from < STEPS, f"three kills all came after the last commit ({STEPS})"
    assert run(config, run_dir, log=log) == 0, log.read_text()[-3000:]
    return resumed_from


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    return {}


def reference(runs: dict, root: Path, model: str, parallel: str) -> Path:
    """The uninterrupted run of a variant, made once per module."""
    if (model, parallel) not in runs:
        config = write_config(root / f"{model}-{parallel}.yaml", model, parallel)
        run_dir, log = root / f"ref-{model}-{parallel}", root / f"ref-{model}-{parallel}.log"
        assert run(config, run_dir, log=log) == 0, log.read_text()[-3000:]
        runs[model, parallel] = run_dir
    return runs[model, parallel]


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "library-models"
    path.mkdir(exist_ok=True)
    return path


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return last_per_step(read_metrics(Store(str(run_dir))), key)


@pytest.mark.parametrize(("model", "parallel"), VARIANTS)
def test_killed_and_resumed_ends_bit_identical(
    model: str, parallel: str, runs: dict, root: Path, tmp_path: Path
) -> None:
    ref = reference(runs, root, model, parallel)
    config = write_config(tmp_path / "run.yaml", model, parallel)
    at = killed_then_resumed(
        config, tmp_path / "run", random.Random(model + parallel), tmp_path / "log"
    )
    assert 2 <= at < STEPS
    want, got = final_state(ref, STEPS), final_state(tmp_path / "run", STEPS)
    assert_same(want, got)
    assert sorted(losses(ref)) == list(range(1, STEPS + 1))
    assert losses(tmp_path / "run") == losses(ref)
    # eval uses BatchNorm's running statistics: every rank's must have resumed exactly
    assert losses(tmp_path / "run", "eval/loss") == losses(ref, "eval/loss") != {}
    if model == "gpt2":  # still one tensor: it trained as one
        assert torch.equal(got[TIE[0]], got[TIE[1]])
    else:  # every training forward counted once, from rank 0's buffers (int64, exact)
        counters = [v for k, v in got.items() if k.endswith("num_batches_tracked")]
        assert counters and all(c.dtype == torch.int64 and c.item() == STEPS for c in counters)


@pytest.mark.parametrize(("model", "parallel"), VARIANTS)
def test_export_loads_into_the_library_class_with_the_same_outputs(
    model: str, parallel: str, runs: dict, root: Path, tmp_path: Path
) -> None:
    ref = reference(runs, root, model, parallel)
    task = build_task(TASKS[model]["_target_"], _params(model))
    out = tmp_path / "hf" / "model.safetensors"
    ckpt = catalog.scan(Store(str(ref))).latest()
    done = subprocess.run(
        [STOCKPOT, "export", str(ref / ckpt.rel), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    exported = load_file(out)
    trained = _restored_in_one_process(task, ref)  # 2 ranks -> 1, model and optimizer
    own = trained.state_dict()
    if model == "gpt2":  # written once, under its owner's name, as save_pretrained does
        assert "lm_head.weight" not in exported and "transformer.wte.weight" in exported
        assert trained.lm_head.weight is trained.transformer.wte.weight
    assert exported.keys() == own.keys() - {"lm_head.weight"}
    assert_same(exported, {k: own[k] for k in exported})
    loaded = _load_back(model, trained, out)
    if model == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert_same(dict(loaded.state_dict()), dict(own))
    batch = task.eval_set().batch(torch.arange(4))
    trained.eval()
    with torch.no_grad():
        assert torch.equal(_logits(model, loaded, batch), _logits(model, trained, batch))


@SKIP_TIMM
def test_timm_resnet_is_sharded_by_stage() -> None:
    """timm declares no `_no_split_modules` and keeps its blocks in `nn.Sequential` stages, so
    the FSDP units are its direct children: the stem, `bn1`, the four stages and the head,
    which hold every parameter."""
    from orchestrator.sharding import plan

    model = build_task(TASKS["timm"]["_target_"], _params("timm")).build_model()
    shards = plan(model)
    assert [name for name, _ in shards.units] == [
        "conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"
    ]  # fmt: skip
    assert "from the direct children with parameters" in shards.describe()
    in_units = {id(p) for _, unit in shards.units for p in unit.parameters()}
    assert all(id(p) in in_units for p in model.parameters())


def test_tied_model_resumes_at_another_world_size_and_init_from_keeps_the_tie(
    runs: dict, root: Path, tmp_path: Path
) -> None:
    from orchestrator.runner import init_from

    run_dir = tmp_path / "run"
    shutil.copytree(reference(runs, root, "gpt2", "fsdp"), run_dir)
    config = write_config(tmp_path / "run.yaml", "gpt2", "fsdp")
    more = (f"trainer.max_steps={STEPS + 2}", "trainer.nproc=1", "resume.allow_config_change=true")
    assert run(config, run_dir, *more, log=tmp_path / "log") == 0
    assert (
        "resuming world size 1 from a checkpoint of world size 2" in (tmp_path / "log").read_text()
    )
    state = final_state(run_dir, STEPS + 2)
    assert torch.equal(state[TIE[0]], state[TIE[1]])

    task = build_task(TASKS["gpt2"]["_target_"], _params("gpt2"))
    out = tmp_path / "model.safetensors"
    ckpt = catalog.scan(Store(str(run_dir))).latest()
    subprocess.run(
        [STOCKPOT, "export", str(run_dir / ckpt.rel), "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    torch.manual_seed(1)
    fresh = task.build_model()
    init_from(fresh, str(out), Store(str(tmp_path / "fine")))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, state[TIE[0]])


def _params(model: str) -> dict[str, Any]:
    return {k: v for k, v in TASKS[model].items() if k != "_target_"}


def _restored_in_one_process(task: Any, run_dir: Path) -> torch.nn.Module:
    from orchestrator.checkpoint.checkpointer import Checkpointer
    from orchestrator.state import ModelAndOptimizer

    torch.manual_seed(123)  # not the run's seed: everything must come from the checkpoint
    model = task.build_model()
    optim = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.01)
    ckpt = Checkpointer(Store(str(run_dir)))
    ckpt.register("train", ModelAndOptimizer(model, optim))
    assert ckpt.restore().step == STEPS
    return model


def _load_back(model: str, trained: torch.nn.Module, out: Path) -> torch.nn.Module:
    """The exported file, loaded into a fresh model the library's own way."""
    if model == "timm":
        import timm

        params = TASKS["timm"]  # `checkpoint_path` loads strictly: every key, no extra one
        return timm.create_model(
            params["model"], num_classes=4, checkpoint_path=str(out), **params["kwargs"]
        )
    trained.config.save_pretrained(out.parent)
    return type(trained).from_pretrained(out.parent)


def _logits(model: str, module: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    module.eval()
    x = batch[0]
    if model == "timm":
        return module(x)
    return (module(pixel_values=x) if x.is_floating_point() else module(input_ids=x)).logits
