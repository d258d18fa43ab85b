"""A small GPT and a character dataset, nanoGPT-style: what `plain.py` and `train.py` train."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )
        self.drop = nn.Dropout(dropout)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int = 32,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, block_size, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def corpus(n_chars: int = 20_000, seed: int = 1234) -> str:
    """A deterministic toy corpus (no download): words drawn from a small vocabulary."""
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "dogs",
        "ran",
        "far",
        "and",
        "wide",
        "under",
        "blue",
        "skies",
    ]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(words), (n_chars // 4,), generator=g).tolist()
    return " ".join(words[i] for i in picks)[:n_chars]


class CharDataset(torch.utils.data.Dataset):
    """Map-style: sample i is the block starting at i * stride, shifted by a random offset (a
    small augmentation drawn from torch's RNG, as data pipelines do)."""

    def __init__(self, text: str, block_size: int = 32, stride: int = 16) -> None:
        chars = sorted(set(text))
        self.vocab_size = len(chars)
        self.data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
        self.block_size, self.stride = block_size, stride

    def __len__(self) -> int:
        return (len(self.data) - self.block_size - self.stride - 1) // self.stride

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride + int(torch.randint(self.stride, ()))
        chunk = self.data[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's rule: decay the matrices, not the biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def warmup_cosine(warmup: int, max_steps: int, min_ratio: float = 0.1):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
