"""Wrap a model for data parallelism: DDP, or FSDP2 (`fully_shard`) with optional bf16.

With one rank there is nothing to synchronise: the plain module trains identically, and its
state dict has the same names, so checkpoints move freely between world sizes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn

from orchestrator import dist


def wrap(model: nn.Module, parallel: str, *, device: str, mixed_precision: str = "no") -> nn.Module:
    model.to(device)
    if dist.world_size() == 1:
        return model
    if parallel == "ddp":
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        return _fully_shard(model, device, mixed_precision)
    raise ValueError(f"trainer.parallel must be ddp or fsdp (got {parallel!r})")


def _fully_shard(model: nn.Module, device: str, mixed_precision: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.world_size(),))
    kwargs: dict = {"mesh": mesh}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for unit in shard_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)  # in place: the module's class becomes an FSDPModule subclass
    return model


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Sub-modules sharded on their own: transformer blocks (`model.blocks`) when the model
    has them, else every direct child that holds parameters."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return [m for m in model.children() if any(True for _ in m.parameters())]


def autocast(device: str, parallel: str, mixed_precision: str) -> AbstractContextManager:
    """bf16 autocast for DDP and single-rank runs; FSDP2 casts through its policy instead."""
    if mixed_precision != "bf16" or (parallel == "fsdp" and dist.world_size() > 1):
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
