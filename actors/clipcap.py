"""ACCM's reference mapper (``mapper_arch: "clipcap"``): ClipCap's ``TransformerMapper`` as the ACCM authors ship it.

Written from the authors' definition (ASGO-MM/ACCM @ 50f1bd8, llava/model/multimodal_encoder/clipcap_model.py);
the module tree keeps their parameter names, so a ``coco_prefix-*.pt`` checkpoint converts by renaming its
``clip_project.`` prefix away (``jobs/convert_accm_checkpoint.py``)::

    linear                                  Linear(feature_dim -> hidden) per discarded patch
    prefix_const                            [P, hidden] learned constants
    transformer.layers.{i}.norm1 / norm2    LayerNorm (eps 1e-5), pre-norm
    transformer.layers.{i}.attn.to_queries / to_keys_values (no bias) / project (bias)
    transformer.layers.{i}.mlp.fc1 / fc2    ReLU MLP

No final norm; the prefix is the last P outputs. Attention is spelled out with matmuls (no SDPA) so
``torch.utils.flop_counter.FlopCounterMode`` sees it and agrees with ``pipeline.flops.encoder_flops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClipCapAttention(nn.Module):
    """Multi-head self-attention of ClipCap (clipcap_model.py lines 58-85, ``MultiHeadAttention``)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError("mapper hidden size must divide by its heads")
        self.heads = heads
        self.scale = (d // heads) ** -0.5  # clipcap_model.py line 63: head_dim ** -0.5
        # clipcap_model.py lines 64-66; TransformerLayer passes bias=False (line 104), project keeps its bias
        self.to_queries = nn.Linear(d, d, bias=False)
        self.to_keys_values = nn.Linear(d, 2 * d, bias=False)
        self.project = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)  # [b, h, n, hd]
        # clipcap_model.py lines 76-77: reshape (b, m, 2, heads, head_dim); keys = [:, :, 0], values = [:, :, 1]
        kv = self.to_keys_values(x).view(b, n, 2, h, c // h)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale  # line 78; no mask is passed by the mapper (line 151)
        out = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)  # lines 83-84
        return self.project(out)


class ClipCapMLP(nn.Module):
    """``MlpTransformer`` (clipcap_model.py lines 41-55): fc1, ReLU, fc2 (dropout 0)."""

    def __init__(self, d: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, intermediate)
        self.fc2 = nn.Linear(intermediate, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ClipCapLayer(nn.Module):
    """``TransformerLayer`` (clipcap_model.py lines 88-110): x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, d: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)  # nn.LayerNorm default eps 1e-5 (line 107, norm_layer=nn.LayerNorm)
        self.attn = ClipCapAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = ClipCapMLP(d, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # line 96
        return x + self.mlp(self.norm2(x))  # line 97


class ClipCapTransformer(nn.Module):
    """``Transformer`` with enc_dec=False (clipcap_model.py lines 113-146): a plain stack, no final norm."""

    def __init__(self, d: int, heads: int, layers: int, intermediate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipCapLayer(d, heads, intermediate) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipCapMapper(nn.Module):
    """``TransformerMapper`` (clipcap_model.py lines 149-164): Linear per patch ++ P constants -> last P outputs.

    The authors build it with 8 heads (line 162) and mlp_ratio 2 (``Transformer`` default, line 135), i.e.
    intermediate = 2 * hidden; both come from ``CaptionConfig`` here so that a small one can be trained."""

    def __init__(self, config) -> None:
        super().__init__()
        if config.patch_prefix:
            raise ValueError("mapper_arch 'clipcap' has a P-slot prefix only (patch_prefix must be false)")
        self.prefix_len = config.prefix_len
        self.patch_prefix = False
        self.linear = nn.Linear(config.feature_dim + int(config.kept_context), config.hidden)  # line 163 ("modified": a per-token Linear)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_len, config.hidden))  # line 164
        self.transformer = ClipCapTransformer(config.hidden, config.mapper_heads, config.mapper_layers,
                                              config.mapper_intermediate)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.layers

    def standardize_input(self, features: Tensor) -> dict[str, float]:
        from actors.captioner import standardize_linear

        return standardize_linear(self.linear, features)

    def forward(self, discarded: Tensor) -> Tensor:
        """[B, M, Dv] -> prefix [B, P, d] (clipcap_model.py lines 151-155)."""
        x = self.linear(discarded)
        x = torch.cat([x, self.prefix_const.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        return self.transformer(x)[:, -self.prefix_len :]  # [:, clip_length:] = the last P outputs
