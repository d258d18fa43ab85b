"""Where training stands (step, schedule horizon, config, eval history, restarts), saved with
every checkpoint as one JSON leaf so its shape may change from save to save."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Progress:
    step: int = 0
    # Cosine horizon fixed at the first start (scheduler.decay_steps or trainer.max_steps).
    horizon: int = 0
    # computation_view() of the config the run started with: a resume must match it.
    config: dict[str, Any] = field(default_factory=dict)
    # Eval metrics as they were measured: [{"step": 100, "eval/loss": 0.4, ...}, ...].
    history: list[dict[str, Any]] = field(default_factory=list)
    # How many times this run has resumed from a checkpoint.
    resumes: int = 0

    def state_dict(self) -> dict[str, str]:
        return {"json": json.dumps(asdict(self), sort_keys=True)}

    def load_state_dict(self, state: dict[str, str]) -> None:
        loaded = json.loads(state["json"])
        for key, value in loaded.items():
            if hasattr(self, key):
                setattr(self, key, value)

    def best(self, metric: str, mode: str = "min") -> dict[str, Any] | None:
        scored = [h for h in self.history if metric in h]
        if not scored:
            return None
        return (min if mode == "min" else max)(scored, key=lambda h: h[metric])
