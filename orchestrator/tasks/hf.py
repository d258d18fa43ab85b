"""Hugging Face `transformers` models as stockpot tasks, built from a config (nothing downloaded).

`CausalLM` trains any causal LM `transformers` knows (`model_type: gpt2`, `llama`, ...) on the
bytes of a text file (vocabulary 256, so no tokenizer is needed); `ImageClassification` trains
an image classifier (`model_type: resnet`, ...) on synthetic images. `config` holds the model
config's own keyword arguments (`n_layer`, `hidden_sizes`, ...). Under FSDP the blocks the model
declares in `_no_split_modules` are sharded on their own; tied embeddings stay tied through
save, resume and `stockpot export` (see the README, "Bring your own model").

`transformers` is not a dependency of stockpot: install it beside it (`pip install
"transformers>=5,<6"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.errors import ConfigError, require
from orchestrator.tasks.base import Batch, Tensors
from orchestrator.tasks.charlm import VOCAB, CharLM, Windows


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            'this task needs transformers: pip install "transformers>=5,<6"'
        ) from None
    return transformers


def _config(model_type: str, kwargs: Mapping[str, Any]) -> Any:
    """`AutoConfig.for_model` with a one-line error for an unknown type or keyword."""
    try:
        return _transformers().AutoConfig.for_model(model_type, **dict(kwargs))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"task.model_type {model_type!r}: {exc}") from None


class CausalLM:
    """Next-byte prediction with a `transformers` causal LM; the data is `CharLM`'s."""

    def __init__(
        self,
        model_type: str = "gpt2",
        config: Mapping[str, Any] | None = None,
        text_path: str | None = None,
        seq_len: int = 64,
        eval_fraction: float = 0.05,
    ) -> None:
        self.model_type, self.config = model_type, dict(config or {})
        require("vocab_size" not in self.config, "task.config.vocab_size is 256 (bytes): drop it")
        self._text = CharLM(text_path=text_path, seq_len=seq_len, eval_fraction=eval_fraction)

    @property
    def name(self) -> str:
        return f"hf-{self.model_type}"

    def build_model(self) -> nn.Module:
        config = _config(self.model_type, {"vocab_size": VOCAB, **self.config})
        return _transformers().AutoModelForCausalLM.from_config(config)

    def train_set(self) -> Windows:
        return self._text.train_set()

    def eval_set(self) -> Windows:
        return self._text.eval_set()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        x, y = batch
        with torch.no_grad():
            logits = model(input_ids=_at_least_one(x)).logits[: len(x)].flatten(0, 1).float()
            loss = F.cross_entropy(logits, y.flatten(), reduction="sum")
            correct = (logits.argmax(dim=-1) == y.flatten()).sum()
        return {"loss": loss.item(), "accuracy": float(correct.item()), "count": float(y.numel())}


class ImageClassification:
    """A `transformers` image classifier on synthetic images: the label is the quadrant that
    holds a bright square, on Gaussian noise (generated from `data_seed`, never the global RNG)."""

    def __init__(
        self,
        model_type: str = "resnet",
        config: Mapping[str, Any] | None = None,
        image_size: int = 16,
        n_train: int = 2048,
        n_eval: int = 256,
        data_seed: int = 0,
    ) -> None:
        require(image_size >= 4 and image_size % 2 == 0, "task.image_size must be even, >= 4")
        require(n_train >= 1 and n_eval >= 1, "task.n_train and task.n_eval must be >= 1")
        self.model_type, self.config = model_type, dict(config or {})
        self.image_size, self.n_train, self.n_eval = image_size, n_train, n_eval
        self.data_seed = data_seed

    @property
    def name(self) -> str:
        return f"hf-{self.model_type}-quadrants"

    def build_model(self) -> nn.Module:
        config = _config(self.model_type, {"num_labels": 4, "num_channels": 3, **self.config})
        return _transformers().AutoModelForImageClassification.from_config(config)

    def train_set(self) -> Tensors:
        return _quadrants(self.n_train, self.image_size, self.data_seed * 2)

    def eval_set(self) -> Tensors:
        return _quadrants(self.n_eval, self.image_size, self.data_seed * 2 + 1)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(pixel_values=x).logits, y)

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        x, y = batch
        with torch.no_grad():
            logits = model(pixel_values=_at_least_one(x)).logits[: len(x)].float()
            loss = F.cross_entropy(logits, y, reduction="sum")
            correct = (logits.argmax(dim=-1) == y).sum()
        return {"loss": loss.item(), "accuracy": float(correct.item()), "count": float(len(y))}


def _at_least_one(x: torch.Tensor) -> torch.Tensor:
    """`x`, or one zero sample when it is empty: library models refuse a batch of 0, yet every
    rank must run the forward (under FSDP it all-gathers parameters with the other ranks)."""
    return x if len(x) else torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)


def _quadrants(n: int, size: int, seed: int) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    half = size // 2
    for quadrant in range(4):
        rows, cols = divmod(quadrant, 2)
        chosen = labels == quadrant
        images[chosen, :, rows * half : (rows + 1) * half, cols * half : (cols + 1) * half] += 1.5
    return Tensors(images, labels)
