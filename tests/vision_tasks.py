"""A timm model as a user brings one (`task._target_: tests.vision_tasks.TimmClassification`):
built by `timm.create_model` with `pretrained=False` (nothing downloaded), trained on the
synthetic quadrant images of `orchestrator.tasks.hf.ImageClassification`.

timm and torchvision are the `vision` extra; PyPI's builds import only beside the torch they were
built for (2.14.1, `make test-torch`), not the dev venv's 2.13.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.tasks.base import Batch
from orchestrator.tasks.hf import ImageClassification


def torch_version() -> tuple[int, int]:
    """(major, minor) of the torch installed here: `2.14.1+cpu` -> (2, 14)."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def timm_problem() -> str | None:
    """None when timm imports here, else why not, in one line. torchvision built for another
    torch fails in its own ways (a missing operator, an undefined symbol), not only ImportError."""
    try:
        import timm  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


class TimmClassification(ImageClassification):
    """`timm.create_model(model, num_classes=4, **kwargs)` on 3-channel quadrant images."""

    def __init__(
        self,
        model: str = "resnet10t",
        kwargs: Mapping[str, Any] | None = None,
        image_size: int = 32,
        n_train: int = 512,
        n_eval: int = 64,
        data_seed: int = 0,
    ) -> None:
        super().__init__(image_size=image_size, n_train=n_train, n_eval=n_eval, data_seed=data_seed)
        self.model, self.kwargs = model, dict(kwargs or {})

    @property
    def name(self) -> str:
        return f"timm-{self.model}-quadrants"

    def build_model(self) -> nn.Module:
        import timm

        return timm.create_model(self.model, pretrained=False, num_classes=4, **self.kwargs)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        x, y = batch
        with torch.no_grad():  # an empty batch still runs a forward: FSDP all-gathers in it
            logits = model(x if len(x) else torch.zeros(1, *x.shape[1:]))[: len(x)].float()
            loss = F.cross_entropy(logits, y, reduction="sum")
            correct = (logits.argmax(dim=-1) == y).sum()
        return {"loss": loss.item(), "accuracy": float(correct.item()), "count": float(len(y))}
