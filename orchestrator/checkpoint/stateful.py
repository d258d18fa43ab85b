"""What the Checkpointer registers: objects with state_dict/load_state_dict, or a hook pair.

An object may also have `before_change(callback) -> Handle | None`: it promises to call
`callback` before the tensors its `state_dict()` returned next change, which lets a background
save write them without copying them first (snapshot.py, state.ModelAndOptimizer). One with
`not_in_checkpoint(step)` may be missing from a checkpoint: a restore calls that instead of
failing (ema.EMA, added to a run since the checkpoint was saved).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class Handle(Protocol):
    def remove(self) -> None: ...


class Hooks:
    """Adapts a pair of save/load functions to the Stateful protocol."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], None]) -> None:
        self._save, self._load = save, load

    def state_dict(self) -> Any:
        return self._save()

    def load_state_dict(self, state: Any) -> None:
        self._load(state)
