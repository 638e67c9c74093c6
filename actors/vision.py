"""Vision stage: the CLIP tower run once, stopped at LLaVA's feature layer, with that layer's attention.

LLaVA feeds the projector with ``hidden_states[vision_feature_layer]`` (-2: the penultimate layer's
output) minus CLS. The pruners also need that same layer's CLS->patch attention and its keys
(VisionZip), so the loop below runs the encoder layers itself and computes the feature layer's
attention by hand: no ``output_attentions`` over the whole tower, no second pass, and the layers after
the feature layer (whose outputs LLaVA never reads) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernels.token_scores import cls_attention_scores


@dataclass
class VisionBatch:
    """What the pruners need from the tower, per image."""

    patch_features: Tensor  # [B, N, Dv] feature-layer output, CLS dropped
    cls_attention: Tensor  # [B, N] CLS->patch attention of the feature layer, summed over heads
    keys: Tensor | None  # [B, N, Dv] the feature layer's attention keys (VisionZip merging)
    cls_feature: Tensor | None = None  # [B, Dv] feature-layer CLS output (VisionZip keeps it)

    def __len__(self) -> int:
        return self.patch_features.shape[0]

    def select(self, rows: list[int] | slice) -> VisionBatch:
        """A sub-batch (rows in the given order)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return VisionBatch(
            pick(self.patch_features), pick(self.cls_attention), pick(self.keys), pick(self.cls_feature)
        )


def feature_layer_count(num_layers: int, feature_layer: int) -> int:
    """How many encoder layers must run so that ``hidden_states[feature_layer]`` exists."""
    n = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= n <= num_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} needs 1..{num_layers} layers, got {n}")
    return n


def _attention_with_probs(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One CLIPEncoderLayer forward (eager), returning (output, attention probs [B,H,T,T], keys [B,T,D])."""
    attn = layer.self_attn
    b, t, d = hidden.shape
    heads, hd = attn.num_heads, attn.head_dim
    x = layer.layer_norm1(hidden)
    q = attn.q_proj(x).view(b, t, heads, hd).transpose(1, 2)
    k_flat = attn.k_proj(x)
    k = k_flat.view(b, t, heads, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, heads, hd).transpose(1, 2)
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1, dtype=torch.float32).to(
        q.dtype
    )
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, d)
    hidden = hidden + attn.out_proj(out)
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, probs, k_flat


@torch.no_grad()
def encode_images(
    vision_tower: nn.Module,
    pixel_values: Tensor,
    *,
    feature_layer: int = -2,
    select_strategy: str = "default",
) -> VisionBatch:
    """Run a ``CLIPVisionModel`` once up to ``feature_layer``; features, CLS attention and keys of that layer."""
    if select_strategy != "default":
        raise ValueError("only vision_feature_select_strategy='default' (CLS dropped) is supported")
    layers = vision_tower.encoder.layers
    n_run = feature_layer_count(len(layers), feature_layer)
    dtype = next(vision_tower.parameters()).dtype
    hidden = vision_tower.embeddings(pixel_values.to(dtype))
    hidden = vision_tower.pre_layrnorm(hidden)
    for layer in layers[: n_run - 1]:
        hidden = layer(hidden, None)
    hidden, probs, keys = _attention_with_probs(layers[n_run - 1], hidden)
    cls_attention = cls_attention_scores(probs[:, :, 0, 1:])  # Triton on CUDA, reference on CPU
    return VisionBatch(
        patch_features=hidden[:, 1:],
        cls_attention=cls_attention,
        keys=keys[:, 1:],
        cls_feature=hidden[:, 0],
    )
