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
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial

import torch
import torch.nn as nn

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
) -> nn.Module:
    """`shard_modules`: the FSDP units by class name, or one import path to a policy function
    (see `orchestrator.sharding`); empty chooses them from the model."""
    model.to(device)
    if dist.world_size() == 1:
        return model
    if parallel == "ddp":
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        return _fully_shard(model, device, mixed_precision, shard_modules)
    raise ValueError(f"trainer.parallel must be ddp or fsdp (got {parallel!r})")


def _fully_shard(
    model: nn.Module, device: str, mixed_precision: str, shard_modules: Sequence[str]
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
    for _, unit in chosen.units:
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
