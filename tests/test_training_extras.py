"""What the built-in loop gained: `optim._target_` / `scheduler._target_` with kwargs, no weight
decay for norms and biases, activation checkpointing and `torch.compile`.

The pure parts are tested in-process; then one real 2-rank FSDP job with all of them on,
SIGKILLed mid-run and resumed (with activation checkpointing switched off for the rest), must end
bit-identical to an uninterrupted run without activation checkpointing; and a compiled run trains
and resumes on one rank.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator import parallel
from orchestrator.config import OptimConfig, SchedulerConfig, load
from orchestrator.errors import ConfigError
from orchestrator.optim import (
    build_optimizer,
    build_scheduler,
    check_targets,
    lr_multiplier,
    param_groups,
)
from tests import runs
from tests.ckpt_helpers import assert_same, final_state

MAX_STEPS, KILL_AFTER, EVERY = 16, 6, 3
EXTRAS = [
    "configs/demo.yaml", "trainer.parallel=fsdp", f"checkpoint.every_steps={EVERY}",
    "trainer.log_every=1", "trainer.eval_every=null", *runs.SMALL_DATA,
    "optim._target_=torch.optim.RAdam", "optim.kwargs.decoupled_weight_decay=true",
    "optim.decay_norms_and_biases=false", "optim.weight_decay=0.1",
    "scheduler._target_=StepLR", "scheduler.kwargs.step_size=5", "scheduler.kwargs.gamma=0.5",
    "scheduler.warmup_steps=0",
]  # fmt: skip


class Block(nn.Module):
    calls = 0  # forward runs, recomputations included

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Block.calls += 1
        return x + torch.relu(self.linear(self.norm(x)))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ModuleList([Block(), Block()]), nn.Linear(4, 2))


def run_tiny(model: nn.Module) -> list[torch.Tensor]:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    h = model[0](x)
    for block in model[1]:
        h = block(h)
    model[2](h).square().sum().backward()
    return [p.grad for p in model.parameters()]


def halving_every(optimizer: torch.optim.Optimizer, every: int):
    """A factory, as `scheduler._target_` may name one."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=0.5)


def not_a_schedule(optimizer: torch.optim.Optimizer) -> int:
    return 3


def test_decay_norms_and_biases_false_puts_every_vector_in_a_group_without_decay() -> None:
    model = tiny()
    default = build_optimizer(model, OptimConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in default.param_groups] == [0.1]  # today's behaviour
    cfg = OptimConfig(weight_decay=0.1, decay_norms_and_biases=False)
    groups = param_groups(model.named_parameters(), cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, kept = ([names[id(p)] for p in g["params"]] for g in groups)
    assert decayed == ["0.weight", "1.0.linear.weight", "1.1.linear.weight", "2.weight"]
    assert all(n.endswith(("bias", "norm.weight")) for n in kept) and len(kept) == 8
    optimizer = build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize(
    ("shape", "halfway"), [("linear", 0.5), ("cosine", 0.5), ("minus-sqrt", 1 - 0.5**0.5)]
)
def test_wsd_is_flat_then_cools_down_over_its_last_steps(shape: str, halfway: float) -> None:
    cfg = SchedulerConfig(name="wsd", warmup_steps=10, cooldown_steps=20, cooldown_shape=shape,
                          min_lr_ratio=0.1)  # fmt: skip
    factor = lr_multiplier(cfg, lambda: 100)
    assert [factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # warmup
    assert {factor(s) for s in range(10, 81)} == {1.0}  # stable, up to the cooldown's start
    assert factor(90) == pytest.approx(0.1 + 0.9 * halfway)
    assert factor(100) == pytest.approx(0.1) and factor(99) > factor(100)
    fraction = lr_multiplier(SchedulerConfig(name="wsd", cooldown_fraction=0.25), lambda: 100)
    assert fraction(75) == 1.0 and fraction(76) < 1.0


def test_targets_are_torch_names_or_import_paths_built_with_their_kwargs() -> None:
    model = tiny()
    for target in ("SGD", "torch.optim.SGD", "torch.optim:SGD"):
        cfg = OptimConfig(target=target, lr=0.1, kwargs={"momentum": 0.9, "nesterov": True})
        optimizer = build_optimizer(model, cfg)
        assert type(optimizer) is torch.optim.SGD and optimizer.defaults["nesterov"] is True
    sgd = build_optimizer(model, OptimConfig(name="sgd", lr=1.0, kwargs={"nesterov": False}))
    assert sgd.defaults["momentum"] == 0.0  # the built-in names take kwargs too
    step = build_scheduler(sgd, SchedulerConfig(target="StepLR", kwargs={"step_size": 2}), int)
    factory = SchedulerConfig(target=f"{__name__}:halving_every", kwargs={"every": 2})
    made = build_scheduler(build_optimizer(model, OptimConfig(lr=1.0)), factory, int)
    for schedule in (step, made):
        for _ in range(4):
            schedule.optimizer.step()  # no gradients: moves nothing, keeps torch's order
            schedule.step()
        assert schedule.get_last_lr()[0] == pytest.approx(0.01 if schedule is step else 0.25)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["optim._target_=nope.X"], "optim._target_: cannot import 'nope.X' (No module named"),
        (["optim._target_=Adamw"], "optim._target_: cannot import 'Adamw' (module 'torch.optim'"),
        (["optim.kwargs.bogus=1"], "optim: AdamW(...) refused its arguments"),
        (["scheduler._target_=StepLR"], "scheduler.warmup_steps, min_lr_ratio and decay_steps"),
        (["scheduler._target_=StepLR", "scheduler.warmup_steps=0"], "StepLR(...) refused"),
        ([f"scheduler._target_={__name__}.not_a_schedule", "scheduler.warmup_steps=0"],
         "returned a int, not a scheduler"),
        (["scheduler._target_=ReduceLROnPlateau", "scheduler.warmup_steps=0"],
         "ReduceLROnPlateau steps on a metric"),
        (["optim.kwargs.lr=1"], "optim.kwargs must not set lr: use optim.lr"),
        (["optim.target=SGD"], "unknown config key 'optim.target'; write optim._target_"),
    ],
)  # fmt: skip
def test_a_bad_target_or_kwarg_is_one_line_saying_what_to_fix(overrides, says) -> None:
    with pytest.raises(ConfigError) as caught:
        cfg = load("configs/demo.yaml", overrides)
        check_targets(cfg.optim, cfg.scheduler)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_activation_checkpointing_recomputes_the_units_and_keeps_every_name() -> None:
    plain, checkpointed = tiny(), tiny()
    names = list(checkpointed.state_dict())
    parallel.wrap(checkpointed, "fsdp", device="cpu", activation_checkpointing=True)
    assert list(checkpointed.state_dict()) == names
    Block.calls = 0
    want = run_tiny(plain)
    assert Block.calls == 2
    got = run_tiny(checkpointed)
    assert Block.calls == 2 + 4  # each block's forward ran again in backward
    assert_same(got, want)


def test_custom_optimizer_and_schedule_with_checkpointing_resume_bit_identical(
    tmp_path: Path,
) -> None:
    ref, run_dir, log = tmp_path / "ref", tmp_path / "run", tmp_path / "run.log"
    code = runs.stockpot_run(
        [*EXTRAS, f"run.dir={ref}", f"trainer.max_steps={MAX_STEPS}"], log=tmp_path / "ref.log"
    )
    assert code == 0, (tmp_path / "ref.log").read_text()[-3000:]
    first = [*EXTRAS, f"run.dir={run_dir}", "trainer.activation_checkpointing=true"]
    at = _kill_after([*first, f"trainer.max_steps={MAX_STEPS}"], run_dir, KILL_AFTER, log)
    # A bad optim._target_ stops both ranks before training: exit 2, said once, nothing moved.
    bad = tmp_path / "bad.log"
    assert runs.stockpot_run([*first, "optim._target_=nope.X"], log=bad) == 2
    assert bad.read_text().count("optim._target_: cannot import 'nope.X'") == 1, bad.read_text()
    assert "step " not in bad.read_text() and runs.newest_step(run_dir) == at
    # The rest without activation checkpointing: the config drift check lets it through.
    assert runs.stockpot_run([*first[:-1], f"trainer.max_steps={MAX_STEPS}"], log=log) == 0
    runs.assert_resumed_from(run_dir, log.read_text(), [at])  # the refused start did not count
    assert "activation checkpointing: 3 units (Linear x3" in log.read_text()
    state = final_state(run_dir, MAX_STEPS)
    assert_same(final_state(ref, MAX_STEPS), state)
    assert runs.losses(run_dir) == runs.losses(ref)
    # RAdam (its own option saved), biases in a group without decay, StepLR's halvings
    assert state["train.optim.param_groups.0.decoupled_weight_decay"] is True
    assert state["train.optim.param_groups.1.weight_decay"] == 0.0
    assert set(state["train.optim.param_groups.1.params"]) == {"0.bias", "2.bias", "4.bias"}
    lrs = _per_step(run_dir, "lr")
    assert [lrs[s] for s in (4, 5, 9, 10, 15)] == pytest.approx(
        [3e-3, 1.5e-3, 1.5e-3, 7.5e-4, 3.75e-4]
    )


def test_compiled_run_trains_and_resumes(tmp_path: Path, monkeypatch) -> None:
    """On one rank, the whole model (an nn.Sequential, which `module.compile()` would leave
    uncompiled) is compiled: dynamo logs the graph it captured, in both lives of the run."""
    monkeypatch.setenv("TORCH_LOGS", "graph_code")  # the ranks inherit it
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    argv = ["configs/demo.yaml", f"run.dir={run_dir}", "trainer.nproc=1", "trainer.compile=true",
            "trainer.log_every=1", "checkpoint.every_steps=2", *runs.SMALL_DATA]  # fmt: skip
    assert runs.stockpot_run([*argv, "trainer.max_steps=2"], log=log) == 0, log.read_text()[-3000:]
    assert runs.stockpot_run([*argv, "trainer.max_steps=4"], log=log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    runs.assert_resumed_from(run_dir, text, [2])
    assert text.count("compile: the whole model") == 2
    assert text.count("TRACED GRAPH") >= 2, text[-3000:]
    state = final_state(run_dir, 4)
    assert "train.model.0.weight" in state and not any("_orig_mod" in k for k in state)
    losses = runs.losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())


def _kill_after(argv: list[str], run_dir: Path, step: int, log: Path) -> int:
    """Start the job, SIGKILL it (spawner and ranks) once a checkpoint at `step` or later has
    committed; the newest committed step, which the next run must resume from."""
    with open(log, "ab") as out:
        job = subprocess.Popen(
            [runs.STOCKPOT, "run", *argv], cwd=runs.REPO, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    runs.wait_until(lambda: runs.newest_step(run_dir) >= step or job.poll() is not None, "a commit")
    assert job.poll() is None, f"the run ended before the kill: {log.read_text()[-2000:]}"
    os.killpg(job.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL  # the kill landed: the spawner died of it
    at = runs.newest_step(run_dir)
    assert at < MAX_STEPS
    return at


def _per_step(run_dir: Path, key: str) -> dict[int, float]:
    from orchestrator.metrics import last_per_step, read_metrics
    from orchestrator.storage import Store

    return last_per_step(read_metrics(Store(str(run_dir))), key)
