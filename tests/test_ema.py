"""trainer.ema in one process: the update against a hand-computed average, a checkpoint round
trip that continues bit-identically, checkpoints saved with and without it, the names and the
`auto` prefix. The multi-rank kills (DDP, FSDP, async) are the exact-resume tests' reference
runs, which carry trainer.ema (tests/runs.py REFERENCE); export and soup of it: test_soup_dist.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint.checkpointer import Checkpointer
from orchestrator.checkpoint.weights import choose_prefix
from orchestrator.config.ema import ema_name
from orchestrator.ema import EMA, averages
from orchestrator.errors import UsageError
from orchestrator.state import ModelAndOptimizer
from orchestrator.storage import Store
from tests.ckpt_helpers import assert_same, state_at


def _parts(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def _checkpointer(run: Path, model, optimizer, emas: list[EMA]) -> Checkpointer:
    ckpt = Checkpointer(Store(str(run)))
    ckpt.register("train", ModelAndOptimizer(model, optimizer))
    for average in emas:
        ckpt.register(average.name, average)
    return ckpt


def test_names_are_the_digits_after_the_point() -> None:
    assert [ema_name(d) for d in (0.999, 0.9995, 0.9, 0.05, 0.999999)] == [
        "ema_999", "ema_9995", "ema_9", "ema_05", "ema_999999",
    ]  # fmt: skip


def test_every_step_moves_the_average_by_one_minus_decay(tmp_path: Path) -> None:
    """Three steps of a user's own loop (nothing calls the EMA): the shadows equal an average
    computed by hand from the parameters after each step, and each step's checkpoint holds it."""
    model, optimizer = _parts()
    emas = averages(model, optimizer, (0.9, 0.5))
    ckpt = _checkpointer(tmp_path, model, optimizer, emas)
    want = {
        d: {n: p.detach().double().clone() for n, p in model.named_parameters()} for d in (0.9, 0.5)
    }
    for i in range(1, 4):
        _step(model, optimizer, i)
        for d, shadow in want.items():
            for n, p in model.named_parameters():
                shadow[n] = d * shadow[n] + (1 - d) * p.detach().double()
        ckpt.save(i)
        for average in emas:
            saved = state_at(tmp_path, i, f"{average.name}.model.")
            for n, value in want[average.decay].items():
                got = saved[f"{average.name}.model.{n}"]
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), value, rtol=0, atol=1e-6)
                assert torch.equal(got, average.shadows[n]), n
    # The EMA is a complete model: the buffers are saved beside the shadows.
    buffers = state_at(tmp_path, 3, "ema_9.model.1.running_")
    assert_same(buffers["ema_9.model.1.running_mean"], model[1].running_mean)
    assert not torch.equal(emas[0].shadows["0.weight"], model[0].weight)


def test_restored_average_continues_bit_identically(tmp_path: Path) -> None:
    model, optimizer = _parts()
    (average,) = averages(model, optimizer, (0.99,))
    ckpt = _checkpointer(tmp_path, model, optimizer, [average])
    for i in range(1, 3):
        _step(model, optimizer, i)
    ckpt.save(2)
    again, again_optim = _parts(seed=1)  # other weights: the restore must overwrite them
    (resumed,) = averages(again, again_optim, (0.99,))
    assert _checkpointer(tmp_path, again, again_optim, [resumed]).restore().step == 2
    assert_same(resumed.shadows, average.shadows)
    _step(model, optimizer, 3)
    _step(again, again_optim, 3)
    assert_same(resumed.shadows, average.shadows)
    assert_same(again.state_dict(), model.state_dict())


def test_checkpoints_with_and_without_it_both_resume(tmp_path: Path, caplog) -> None:
    """Saved without an EMA, resumed with one: it starts from the restored weights (one line);
    saved with one, resumed without: the extra keys are left unread."""
    model, optimizer = _parts()
    _step(model, optimizer, 1)
    _checkpointer(tmp_path / "plain", model, optimizer, []).save(1)
    again, again_optim = _parts(seed=1)
    (added,) = averages(again, again_optim, (0.999,))
    with caplog.at_level(logging.INFO, logger="orchestrator.ema"):
        _checkpointer(tmp_path / "plain", again, again_optim, [added]).restore()
    assert "ema_999: not in the checkpoint of step 1; starts from its weights" in caplog.text
    assert_same(added.shadows, {n: p.detach() for n, p in model.named_parameters()})
    _step(again, again_optim, 2)  # and it averages from there
    assert not torch.equal(added.shadows["0.weight"], again[0].weight)

    _checkpointer(tmp_path / "ema", again, again_optim, [added]).save(2)
    bare, bare_optim = _parts(seed=2)
    assert _checkpointer(tmp_path / "ema", bare, bare_optim, []).restore().step == 2
    assert_same(bare.state_dict(), again.state_dict())


def test_an_ema_needs_the_optimizer_it_follows() -> None:
    model, _ = _parts()
    assert averages(model, None, ()) == []
    with pytest.raises(ValueError, match="register the optimizer"):
        averages(model, None, (0.9,))


def test_auto_prefix_is_the_trained_model_and_a_name_is_its_model() -> None:
    keys = dict.fromkeys(
        ["train.model.w", "train.optim.state", "ema_999.model.w", "ema_99.model.w", "rng.x"]
    )
    assert choose_prefix(keys, "auto") == "train.model."
    assert choose_prefix(keys, "ema_999") == "ema_999.model."
    assert choose_prefix(keys, "ema_99.model.") == "ema_99.model."
    only_averages = {k: v for k, v in keys.items() if k.startswith("ema_")}
    with pytest.raises(
        UsageError, match=r"several model prefixes: ema_99\.model\., ema_999\.model\."
    ):
        choose_prefix(only_averages, "auto")
