"""Ingredients for the soup tests: real checkpoints written by the real Checkpointer.

`train_run` trains the synthetic task's model in this process (single process, no group) and
commits a checkpoint (model AND optimizer, as training does) at chosen steps, with held-out
metrics in the manifest and the run's config.yaml next to them, so the eval-driven recipes can
build the task. Runs that share `init_seed` start from one model (fine-tunes of one basin);
`order_seed` changes only the data order.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.format import load_flat, stored_items
from orchestrator.config import load as load_config
from orchestrator.config import to_yaml
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store
from orchestrator.tasks.base import eval_batches
from orchestrator.tasks.synthetic import SyntheticClassification

REPO = Path(__file__).resolve().parents[1]
STOCKPOT = str(Path(sys.executable).parent / "stockpot")
TARGET = "orchestrator.tasks.synthetic.SyntheticClassification"
TASK = {"split": "finetune", "hidden": 128, "n_train": 2000, "n_eval": 1000}


def stockpot(*args: Any, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STOCKPOT, *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def task() -> SyntheticClassification:
    return SyntheticClassification(**TASK)  # type: ignore[arg-type]


def held_out(t: SyntheticClassification, model: torch.nn.Module) -> dict[str, float]:
    data = t.eval_set()
    sums: dict[str, float] = {}
    model.eval()
    for idx in eval_batches(len(data), 256, 0, 1):
        for k, v in t.eval_sums(model, data.batch(idx)).items():
            sums[k] = sums.get(k, 0.0) + v
    model.train()
    n = sums.pop("count")
    return {f"eval/{k}": v / n for k, v in sums.items()}


def write_config(run: Path, seed: int = 0) -> None:
    overrides = [f"run.dir={run}", f"run.seed={seed}", f"task._target_={TARGET}"]
    overrides += [f"task.{k}={v}" for k, v in TASK.items()]
    (run / "config.yaml").write_text(to_yaml(load_config(None, overrides)))


def train_run(
    run: Path,
    *,
    init_seed: int = 0,
    order_seed: int = 0,
    saves: Sequence[int] = (10, 20, 30),
    lr: float = 3e-3,
    model: torch.nn.Module | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Train and commit at `saves`; the model's state at each save."""
    t = task()
    torch.manual_seed(init_seed)
    model = model if model is not None else t.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1000 + order_seed)
    ckpt = Checkpointer(Store(str(run)))
    ckpt.register("train", ModelAndOptimizer(model, opt))
    data, states = t.train_set(), {}
    for step in range(1, max(saves) + 1):
        loss = t.loss(model, data.batch(torch.randint(len(data), (64,), generator=gen)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step in saves:
            ckpt.save(step, metrics={"loss": loss.item(), **held_out(t, model)})
            states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt.close()
    write_config(run, init_seed)
    return states


def dcp_model(ckpt: Path | str, prefix: str = "train.model.") -> dict[str, torch.Tensor]:
    """A committed checkpoint's model tensors, loaded by DCP itself (the independent path)."""
    store = Store(str(ckpt))
    info = catalog.load_info(store)
    keys = list(stored_items(store, info.data_rel))
    model_keys = [k for k in keys if k.startswith(prefix)]
    loaded = load_flat(store, info.data_rel, model_keys)
    return {k.removeprefix(prefix): v for k, v in loaded.items()}


def ckpt_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:09d}"


def soup_tensors(out: Path) -> dict[str, torch.Tensor]:
    import json

    record = json.loads((out / "SOUP.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in record["shards"]:
        sub = Path(out, record["data_dir"]) if record["data_dir"] else out
        tensors.update(load((sub / shard).read_bytes()))
    return tensors


def f64_mean(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None):
    """The reference: float64 (weighted) mean, cast once; ints from the first."""
    n = len(states)
    w = [x / sum(weights) for x in weights] if weights else [1.0 / n] * n
    out = {}
    for name, first in states[0].items():
        if not first.dtype.is_floating_point:
            out[name] = first
            continue
        acc = sum(wi * s[name].double() for wi, s in zip(w, states, strict=True))
        out[name] = acc.to(first.dtype)  # type: ignore[union-attr]
    return out


def assert_close_to_rounding(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name], want[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if b.dtype.is_floating_point:
            # One unit in the last place of the output dtype, at most.
            ulp = torch.finfo(b.dtype).eps * b.abs().clamp_min(torch.finfo(b.dtype).tiny)
            assert bool(((a - b).abs() <= ulp).all()), f"{name}: {(a - b).abs().max()}"
        else:
            assert torch.equal(a, b), name


def mixer_reference(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The weighted mean by the mixer's own arithmetic (engine.Mixer._mix, unequal weights), on
    whole tensors: float64 copy of the first times w_1, then `add_(x_i, alpha=w_i)` in ingredient
    order, cast once. Bit for bit the mixer's output: the same float64 operations on the same
    values in the same order, and each is elementwise, so how the mixer cuts a tensor into
    segments does not change a bit (torch's add with alpha is one fused multiply-add per element
    in its vector loop and, as built, in its scalar tail too). `f64_mean` rounds w_i x_i first:
    the same to 1 ulp, not to the bit."""
    assert len(set(weights)) > 1, "equal weights take the mixer's uniform path (sum, then / n)"
    out = {}
    for name, first in states[0].items():
        if not first.dtype.is_floating_point:
            out[name] = first
            continue
        acc = first.to(torch.float64 if first.dtype.itemsize >= 4 else torch.float32, copy=True)
        acc.mul_(weights[0])
        for w, state in zip(weights[1:], states[1:], strict=True):
            acc.add_(state[name].to(acc.dtype), alpha=w)
        out[name] = acc.to(first.dtype)
    return out


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        a, b = (t.reshape(-1).view(torch.uint8) for t in (got[name], want[name]))
        assert torch.equal(a, b), name
