"""A small pre-norm bidirectional transformer encoder: the caption model's mapper (``actors.captioner``) and the
selector's classifier (``actors.selector``) are built from it. Attention is spelled out (no SDPA) so that
``torch.utils.flop_counter.FlopCounterMode`` sees every matmul and agrees with ``pipeline/flops.py``."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional block; attention spelled out so FLOP counters see it."""

    def __init__(self, d: int, heads: int, intermediate: int) -> None:
        super().__init__()
        assert d % heads == 0, "hidden size must divide by heads"
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, intermediate)
        self.out = nn.Linear(intermediate, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class Encoder(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(d, heads, intermediate) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)
