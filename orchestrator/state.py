"""What must survive a restart, as Stateful objects the Checkpointer registers.

`ModelAndOptimizer` goes through DCP's get_state_dict/set_state_dict, so DDP, FSDP2 and plain
modules save unwrapped names and load across world sizes. `RNGState` is per rank.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from orchestrator import dist
from orchestrator.ties import TIED_KEY, tied_parameters


class ModelAndOptimizer:
    """The model's and optimizer's state under their plain (unwrapped) names.

    Two things beyond DCP's own: buffers are saved as rank 0 holds them, the copy every rank's
    next forward starts from (DDP's `broadcast_buffers`; `parallel` does the same under FSDP),
    so which rank's copy DCP happens to write never matters; and a model with tied parameters
    records its ties (`tied`: groups of names, owner first), so an export can write each tied
    tensor once under its owner's name, as `save_pretrained` does.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self._ties = tied_parameters(unwrapped(model))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.optimizer is None:
            model_sd, _ = get_state_dict(self.model, [])
            state = {"model": model_sd}
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        self._buffers_from_leader(model_sd)
        if self._ties:  # only then: checkpoints of untied models keep their old keys
            state[TIED_KEY] = [list(group) for group in self._ties]
        return state

    def before_change(self, callback: Callable[[], None]) -> Any:
        """Call `callback` before the tensors `state_dict()` returns next change, so a background
        save can write them from live memory until then (checkpoint/snapshot.py). Parameters
        and optimizer state change in `optimizer.step()` only; buffers are saved as copies
        (`_buffers_from_leader`). A handle to `remove()`; None without an optimizer (nothing
        says when a bare model changes)."""
        if self.optimizer is None:
            return None
        return self.optimizer.register_step_pre_hook(lambda *_: callback())

    def _buffers_from_leader(self, model_sd: dict[str, Any]) -> None:
        """Replace the state dict's buffers by copies holding rank 0's values (the live
        buffers are left as they are: the next forward overwrites them anyway)."""
        names = sorted(
            name
            for name, _ in unwrapped(self.model).named_buffers()
            if isinstance(model_sd.get(name), torch.Tensor)
        )
        model_sd.update(leader_copies(model_sd, names))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_state_dict(self.model, [], model_state_dict=state["model"], optim_state_dict={})
            return
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


class RNGState:
    """python, numpy, torch (and cuda, when present) RNG streams of this rank."""

    def state_dict(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def leader_copies(tensors: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of `tensors[name]` for each of `names` (the same list on every rank), holding
    rank 0's values: what buffers are saved as (every rank's next forward starts from them)."""
    copies = [tensors[name].detach().clone() for name in names]
    dist.broadcast_tensors(copies, src=dist.LEADER)
    return dict(zip(names, copies, strict=True))


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP (FSDP2 wraps in place: names are unchanged)."""
    inner = getattr(model, "module", None)
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return inner if is_ddp and isinstance(inner, torch.nn.Module) else model
