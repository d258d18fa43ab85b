"""A task for the soup-demo test: the synthetic task whose TEST labels can be redrawn.

`test_relabel_seed >= 0` replaces the test split's labels by random ones (inputs unchanged), so
a soup made twice with two different seeds shows whether any choice depended on the test split.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.tasks.base import Tensors
from orchestrator.tasks.synthetic import SyntheticClassification


class RelabelledTest(SyntheticClassification):
    def __init__(self, test_relabel_seed: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test_relabel_seed = test_relabel_seed

    def test_set(self) -> Tensors:
        x, y = super().test_set().tensors
        if self.test_relabel_seed < 0:
            return Tensors(x, y)
        gen = torch.Generator().manual_seed(self.test_relabel_seed)
        return Tensors(x, torch.randint(self.classes, y.shape, generator=gen))
