"""A byte-level language model: a small decoder-only transformer over a text file.

Sized from a few KB to billions of parameters by `d_model` and `n_layers`; `estimate_parameters`
gives the count without building anything. The blocks are an `nn.ModuleList` named `blocks` so
FSDP2 can `fully_shard` each one; the head is untied from the embedding, so no parameter is
shared between FSDP units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.errors import ConfigError, require
from orchestrator.tasks.base import Batch

VOCAB = 256  # bytes
DEFAULT_TEXT = Path(__file__).parent / "data" / "corpus.txt"


class CharLM:
    """Next-byte prediction on a text file; the held-out part is the file's last bytes."""

    def __init__(
        self,
        text_path: str | None = None,
        seq_len: int = 128,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
        eval_fraction: float = 0.05,
        test_fraction: float = 0.0,
        vocab: Literal["bytes"] = "bytes",
    ) -> None:
        for key, value in (("seq_len", seq_len), ("d_model", d_model), ("n_layers", n_layers)):
            require(
                _is_int(value) and value >= 1, f"task.{key} must be an integer >= 1 (got {value!r})"
            )
        require(
            _is_int(n_heads) and n_heads >= 1 and d_model % n_heads == 0,
            f"task.n_heads must divide task.d_model={d_model} (got {n_heads!r})",
        )
        require(
            d_ff is None or (_is_int(d_ff) and d_ff >= 1),
            f"task.d_ff must be >= 1 or null (got {d_ff!r})",
        )
        require(0.0 <= dropout < 1.0, f"task.dropout must be in [0, 1) (got {dropout!r})")
        require(
            0.0 < eval_fraction < 1.0,
            f"task.eval_fraction must be in (0, 1) (got {eval_fraction!r})",
        )
        require(
            0.0 <= test_fraction < 1.0 - eval_fraction,
            f"task.test_fraction must be in [0, 1 - eval_fraction) (got {test_fraction!r})",
        )
        require(vocab == "bytes", f"task.vocab must be 'bytes' (got {vocab!r})")
        self.text_path = Path(text_path) if text_path is not None else DEFAULT_TEXT
        self.seq_len, self.d_model = seq_len, d_model
        self.n_layers, self.n_heads = n_layers, n_heads
        self.d_ff = d_ff if d_ff is not None else 4 * d_model
        self.dropout, self.eval_fraction = float(dropout), float(eval_fraction)
        # The test part (for soup reports only) is cut from the end of the training part, so
        # the held-out part is the same whatever test_fraction is.
        self.test_fraction = float(test_fraction)
        self._splits: tuple[Windows, Windows] | None = None
        self._test: Windows | None = None

    @property
    def name(self) -> str:
        return f"charlm-{self.text_path.stem}"

    @classmethod
    def estimate_parameters(
        cls, seq_len: int = 128, d_model: int = 128, n_layers: int = 2, d_ff: int | None = None
    ) -> int:
        """Parameters of the model these settings build, counted without building it."""
        d, f = d_model, d_ff if d_ff is not None else 4 * d_model
        block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return VOCAB * d + seq_len * d + n_layers * block + 2 * d + d * VOCAB

    def num_parameters(self) -> int:
        return self.estimate_parameters(self.seq_len, self.d_model, self.n_layers, self.d_ff)

    def build_model(self) -> CharTransformer:
        """The transformer (uses torch's global RNG: the caller seeds it)."""
        return CharTransformer(
            self.seq_len, self.d_model, self.n_layers, self.n_heads, self.d_ff, self.dropout
        )

    def train_set(self) -> Windows:
        return self._load()[0]

    def eval_set(self) -> Windows:
        return self._load()[1]

    def test_set(self) -> Windows | None:
        """The test split (task.test_fraction of the file, before the held-out part); None
        when test_fraction is 0."""
        self._load()
        return self._test

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        x, y = batch
        with torch.no_grad():
            logits = model(x).flatten(0, 1)
            loss = F.cross_entropy(logits.float(), y.flatten(), reduction="sum")
            correct = (logits.argmax(dim=-1) == y.flatten()).sum()
        return {"loss": loss.item(), "accuracy": float(correct.item()), "count": float(y.numel())}

    def _load(self) -> tuple[Windows, Windows]:
        if self._splits is None:
            try:
                raw = self.text_path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"task.text_path: cannot read {self.text_path} ({exc.strerror})"
                ) from None
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            cut = len(data) - int(len(data) * self.eval_fraction)
            need = self.seq_len + 1
            require(
                min(cut, len(data) - cut) >= need,
                f"task.text_path {self.text_path} ({len(data)} bytes) is too short for "
                f"seq_len={self.seq_len} and eval_fraction={self.eval_fraction}: each part needs "
                f">= {need} bytes",
            )
            test_cut = cut - int(len(data) * self.test_fraction)
            if test_cut < cut:
                require(
                    min(test_cut, cut - test_cut) >= need,
                    f"task.test_fraction={self.test_fraction} leaves a part under {need} bytes",
                )
                self._test = Windows(data[test_cut:cut], self.seq_len)
            train = Windows(data[:test_cut], self.seq_len)
            self._splits = (train, Windows(data[cut:], self.seq_len))
        return self._splits


class Windows:
    """Windows of seq_len + 1 bytes starting every seq_len bytes: (input, next-byte target)
    pairs whose targets tile the text, so each byte is predicted exactly once per epoch."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len
        self._offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def batch(self, indices: torch.Tensor) -> Batch:
        rows = self.data[indices[:, None] * self.seq_len + self._offsets].long()
        return rows[:, :-1], rows[:, 1:]


class CharTransformer(nn.Module):
    """Token + learned position embedding, pre-LN causal blocks, final LN, untied head."""

    def __init__(
        self, seq_len: int, d_model: int, n_layers: int, n_heads: int, d_ff: int, dropout: float
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(VOCAB, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, time) byte ids -> (batch, time, 256) next-byte logits."""
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds seq_len={self.seq_len}")
        positions = torch.arange(t, device=tokens.device)
        h = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self._attend(self.ln1(h))
        return h + self.mlp(self.ln2(h))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).transpose(1, 3).unbind(2)
        )
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return F.dropout(
            self.proj(out.transpose(1, 2).reshape(b, t, d)), self.dropout, self.training
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
