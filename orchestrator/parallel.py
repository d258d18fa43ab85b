"""Wrap a model for data parallelism: DDP, or FSDP2 (`fully_shard`) with optional bf16.

With one rank there is nothing to synchronise: the plain module trains identically, and its
state dict has the same names, so checkpoints move freely between world sizes.

Buffers (BatchNorm's running statistics) follow DDP's rule under both strategies: every forward
starts from rank 0's buffers. DDP does it itself (`broadcast_buffers`); FSDP2 leaves buffers
alone, so each rank's statistics would drift apart on its own data, and a checkpoint (which
keeps one rank's copy) would resume differently from a run never stopped. A pre-forward hook
on the root broadcasts them instead.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from types import MethodType
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from orchestrator import dist, sharding
from orchestrator.logs import LEADER_ONLY

log = logging.getLogger(__name__)


def wrap(
    model: nn.Module,
    parallel: str,
    *,
    device: str,
    mixed_precision: str = "no",
    shard_modules: Sequence[str] = (),
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """`shard_modules`: the FSDP units by class name, or one import path to a policy function
    (see `orchestrator.sharding`); empty chooses them from the model. `activation_checkpointing`
    recomputes those units' activations in backward (any strategy); `compile` compiles each
    FSDP unit, else the whole model. Both keep every parameter's name."""
    model.to(device)
    if activation_checkpointing:
        checkpoint_units(model, sharding.plan(model, shard_modules))
    sharded = parallel == "fsdp" and dist.world_size() > 1
    if compile:
        _import_inductor_quietly()
    if compile and not sharded:
        compile_forward(model)
        log.info("compile: the whole model", extra=LEADER_ONLY)
    if dist.world_size() == 1:
        return model
    if parallel == "ddp":
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        return _fully_shard(model, device, mixed_precision, shard_modules, compile)
    raise ValueError(f"trainer.parallel must be ddp or fsdp (got {parallel!r})")


def _import_inductor_quietly() -> None:
    """torch.compile's first call imports torch.utils.mkldnn, which decorates with torch's own
    deprecated `torch.jit.script_method` (torch 2.13): a DeprecationWarning about torch's code,
    nothing a user can act on, and an error under the tests' strict warnings. Imported here once,
    with that one warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`torch.jit.script_method` is deprecated", DeprecationWarning
        )
        import torch.utils.mkldnn  # noqa: F401


def compile_forward(module: nn.Module) -> None:
    """`torch.compile` the module's forward (its checkpointed one, if any), in place. Not
    `torch.compile(module)`: its wrapper renames every parameter `_orig_mod.`. Not
    `module.compile()`: that compiles `_call_impl`, a frame dynamo skips, and then traces only
    forwards of classes outside torch.nn (an nn.Sequential of Linear layers compiles nothing)."""
    bound = module.forward
    assert isinstance(bound, MethodType), f"{type(module).__name__}.forward is not a method"
    module.forward = MethodType(torch.compile(bound.__func__), module)


def checkpoint_units(model: nn.Module, chosen: sharding.ShardPlan) -> None:
    """Recompute each unit's forward in backward (non-reentrant `torch.utils.checkpoint`). The
    unit's own `forward` is replaced, not the module wrapped (`checkpoint_wrapper` would rename
    every parameter `..._checkpoint_wrapped_module.`, and checkpoints, exports and soups go by
    name); hooks (FSDP2's) still run around it."""
    for _, unit in chosen.units:
        unit.forward = MethodType(_checkpointed_forward, unit)
    log.info("activation checkpointing: %s", _count(chosen), extra=LEADER_ONLY)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward  # the class's: a bound method here would outlive a deepcopy
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def _count(chosen: sharding.ShardPlan) -> str:
    counts = Counter(type(m).__name__ for _, m in chosen.units)
    kinds = ", ".join(f"{cls} x{n}" for cls, n in sorted(counts.items())) or "none"
    return f"{len(chosen.units)} units ({kinds}; from {chosen.source})"


def _fully_shard(
    model: nn.Module, device: str, mixed_precision: str, shard_modules: Sequence[str], compile: bool
) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.world_size(),))
    kwargs: dict = {"mesh": mesh}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    chosen = sharding.plan(model, shard_modules)
    saved = persistent_buffers(model)
    log.info("%s", chosen.describe(), extra=LEADER_ONLY)
    if compile:
        log.info("compile: each FSDP unit, %s", _count(chosen), extra=LEADER_ONLY)
    for _, unit in chosen.units:
        if compile:
            compile_forward(unit)  # before fully_shard, like torchtitan
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)  # in place: the module's class becomes an FSDPModule subclass
    if saved:
        model.register_forward_pre_hook(partial(_broadcast_buffers, names=saved))
    return model


def persistent_buffers(model: nn.Module) -> frozenset[str]:
    """Names of the buffers a checkpoint holds (not the non-persistent ones, e.g. rotary
    frequencies, which are rebuilt, never trained)."""
    return frozenset(name for name, _ in model.named_buffers()) & set(model.state_dict())


def _broadcast_buffers(module: nn.Module, args: object, *, names: frozenset[str]) -> None:
    # looked up on every call: a module may replace a buffer instead of updating it in place
    dist.broadcast_tensors([b for n, b in module.named_buffers() if n in names], src=dist.LEADER)


def autocast(device: str, parallel: str, mixed_precision: str) -> AbstractContextManager:
    """bf16 autocast for DDP and single-rank runs; FSDP2 casts through its policy instead."""
    if mixed_precision != "bf16" or (parallel == "fsdp" and dist.world_size() > 1):
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
