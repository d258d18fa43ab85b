"""`trainer.ema`: exponential moving averages of the weights, kept beside the model.

One `EMA` per decay holds a float32 shadow of every floating parameter, of the parameter's own
kind (a DTensor shard under FSDP2, so each rank averages only its shard; a plain tensor under
DDP), and after every `optimizer.step()` moves it towards the parameters:
`shadow += (1 - decay) * (param - shadow)` (`torch._foreach_lerp_`, deterministic). It hooks
the optimizer itself (`register_step_post_hook`), so the built-in loop and a user's own loop
(`api.training`) both get it without calling anything.

It is checkpointed as its own state, `ema_<digits>` (config/ema.py: 0.999 -> `ema_999`), laid
out like `ModelAndOptimizer`'s model: `ema_999.model.<param>` under the plain names, with the
model's buffers beside the shadows, so an export or a soup reads it as a complete model
(`--prefix ema_999`). A checkpoint saved without it starts it from the restored weights
(`not_in_checkpoint`, checkpointer.py); one that holds it while trainer.ema is empty loads all
the same (DCP reads only the keys asked for).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from orchestrator.config.ema import ema_name
from orchestrator.logs import LEADER_ONLY
from orchestrator.state import leader_copies, unwrapped
from orchestrator.ties import TIED_KEY, tied_parameters

log = logging.getLogger(__name__)


class EMA:
    """The moving average with `decay` of `model`'s floating parameters, updated after each
    step of `optimizer`; a Stateful the Checkpointer registers under `name`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, decay: float):
        self.decay, self.name = decay, ema_name(decay)
        self.optimizer = optimizer
        inner = unwrapped(model)
        self._inner = inner
        # named_parameters() lists a tied tensor once, under its owner's name.
        self._params = {n: p for n, p in inner.named_parameters() if p.is_floating_point()}
        self._ties = tied_parameters(inner)
        saved = inner.state_dict(keep_vars=True).keys()  # persistent buffers only
        self._buffer_names = sorted(n for n, _ in inner.named_buffers() if n in saved)
        with torch.no_grad():
            self.shadows = {
                n: p.detach().to(torch.float32, copy=True) for n, p in self._params.items()
            }
        self._locals = [_local(s) for s in self.shadows.values()]
        self._hook = optimizer.register_step_post_hook(lambda *_: self.update())

    def update(self) -> None:
        """One step of the average, towards the parameters as they are now."""
        with torch.no_grad():
            params = [p if p.dtype == torch.float32 else p.float() for p in self._sources()]
            torch._foreach_lerp_(self._locals, params, 1.0 - self.decay)

    def _sources(self) -> list[torch.Tensor]:
        """The parameters' local tensors, taken anew each time: FSDP2 may re-point a sharded
        parameter's local tensor (its lazy init on the first forward does)."""
        return [_local(p) for p in self._params.values()]

    def reset(self) -> None:
        """The average restarts at the parameters as they are now."""
        with torch.no_grad():
            for shadow, param in zip(self._locals, self._sources(), strict=True):
                shadow.copy_(param)

    @property
    def nbytes(self) -> int:
        """Memory of this rank's shadows."""
        return sum(s.nbytes for s in self._locals)

    def state_dict(self) -> dict[str, Any]:
        """The shadows themselves (a restore loads into them in place) and copies of the
        model's buffers as rank 0 holds them, as ModelAndOptimizer saves them."""
        buffers = leader_copies(dict(self._inner.named_buffers()), self._buffer_names)
        model = {**self.shadows, **buffers}
        state: dict[str, Any] = {"model": model}
        if self._ties:
            state[TIED_KEY] = [list(group) for group in self._ties]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Shadows from `state["model"]` (buffers are the model's own, restored with it)."""
        with torch.no_grad():
            for name, shadow in self.shadows.items():
                saved = state["model"][name]
                if saved is not shadow:
                    shadow.copy_(saved)

    def not_in_checkpoint(self, step: int) -> None:
        """The checkpoint restored (of `step`) was saved without this EMA: start it from the
        restored weights rather than fail."""
        self.reset()
        log.info(
            "%s: not in the checkpoint of step %d; starts from its weights",
            self.name,
            step,
            extra=LEADER_ONLY,
        )

    def before_change(self, callback: Callable[[], None]) -> Any:
        """Call `callback` before the shadows change: they change in the step post-hook, so
        the step's pre-hook comes first (a background save reads them live until then)."""
        return self.optimizer.register_step_pre_hook(lambda *_: callback())


def averages(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, decays: Sequence[float]
) -> list[EMA]:
    """One EMA per decay of trainer.ema, hooked to `optimizer`; says what they cost in memory
    (bench/loop.py reads the line)."""
    if not decays:
        return []
    if optimizer is None:
        raise ValueError("trainer.ema averages after each optimizer step: register the optimizer")
    made = [EMA(model, optimizer, d) for d in decays]
    params = sum(_local(p).nbytes for p in unwrapped(model).parameters() if p.is_floating_point())
    log.info(
        "trainer.ema: %s; %.1f MB of shadows per EMA on this rank, %.2fx its parameters",
        ", ".join(e.name for e in made),
        made[0].nbytes / 1e6,
        made[0].nbytes / max(params, 1),
        extra=LEADER_ONLY,
    )
    return made


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: a DTensor's local shard (a view, updated in place)."""
    return t.to_local() if isinstance(t, DTensor) else t
