"""Vision stage: the CLIP tower run once, with what the pruners read from it.

LLaVA feeds the projector with ``hidden_states[vision_feature_layer]`` (-2: the penultimate layer's
output) minus CLS. The loop below runs the encoder layers itself and, on the way, computes:

* the feature layer's CLS->patch attention summed over heads, and its keys averaged over heads
  (VisionZip's dominant scores and merge metric);
* the single-head CLS score PruMerge+/ACCM rank patches by: ``softmax(q kᵀ / sqrt(C))`` of ONE
  full-width head from the *next* layer's ``q_proj``/``k_proj`` on its ``layer_norm1`` input
  (ACCM ``llava/model/multimodal_encoder/clip_encoder.py`` L140-141 hooks layer 23 = the layer after
  LLaVA's -2, L200-210 forms the score). Only CLS's query row is needed, so the next layer is not run:
  its LN1, ``k_proj`` over every token and ``q_proj`` of CLS only (``next_layer_cls_score``);
* optionally (a ``projection`` given) CLIP's projected per-patch embeddings of the LAST layer, which
  PruMerge+'s text-guided picks compare with the question (``project_tokens``); then every layer runs.

Layers after the ones needed are skipped: no ``output_attentions`` over the whole tower, no second pass.
Every layer runs fused attention (``scaled_dot_product_attention``); the CLS row the pruners read is
computed on its own from the feature layer's q and K.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.token_scores import cls_attention_scores


@dataclass
class VisionBatch:
    """What the pruners need from the tower, per image."""

    patch_features: Tensor  # [B, N, Dv] feature-layer output, CLS dropped
    cls_attention: Tensor  # [B, N] CLS->patch attention of the feature layer, summed over heads
    keys: Tensor | None  # [B, N, head_dim] the feature layer's keys averaged over heads (VisionZip)
    cls_feature: Tensor | None = None  # [B, Dv] feature-layer CLS output (VisionZip keeps it)
    # [B, N] PruMerge+'s single-head CLS score from the next layer (see next_layer_cls_score); None when
    # not computed yet (LlavaEngine.prune fills it in from patch_features + cls_feature when needed)
    cls_attention_next: Tensor | None = None
    projected: Tensor | None = None  # [B, N, P] last-layer patches through post_layernorm + projection

    def __len__(self) -> int:
        return self.patch_features.shape[0]

    def select(self, rows: list[int] | slice) -> VisionBatch:
        """A sub-batch (rows in the given order)."""
        return VisionBatch(
            **{f.name: None if (t := getattr(self, f.name)) is None else t[rows] for f in fields(self)}
        )

    @classmethod
    def concat(cls, parts: list[VisionBatch]) -> VisionBatch:
        """Batches stacked along the batch dim (a field is None if the first part lacks it)."""

        def cat(name: str) -> Tensor | None:
            if getattr(parts[0], name) is None:
                return None
            return torch.cat([getattr(p, name) for p in parts])

        return cls(**{f.name: cat(f.name) for f in fields(cls)})


def feature_layer_count(num_layers: int, feature_layer: int) -> int:
    """How many encoder layers must run so that ``hidden_states[feature_layer]`` exists."""
    n = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= n <= num_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} needs 1..{num_layers} layers, got {n}")
    return n


def _clip_layer(layer: nn.Module, hidden: Tensor, *, attention: str = "sdpa",
                cls_row: bool = False) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One CLIPEncoderLayer forward: (output, CLS row probs [B, H, T] or None, q [B,T,D], k [B,T,D]) with q/k
    the raw ``q_proj``/``k_proj`` outputs (biases included, no scaling), as a forward hook on them sees them.

    ``attention``: "sdpa" (``scaled_dot_product_attention``: fused kernels where the device has them) or
    "eager" (the [T, T] matrix written out; the reference). ``cls_row``: the CLS query's attention
    probabilities, computed on their own from q and K (the pruners read only that row)."""
    attn = layer.self_attn
    b, t, d = hidden.shape
    heads, hd = attn.num_heads, attn.head_dim
    x = layer.layer_norm1(hidden)
    q_flat = attn.q_proj(x)
    k_flat = attn.k_proj(x)
    q = q_flat.view(b, t, heads, hd).transpose(1, 2)
    k = k_flat.view(b, t, heads, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, heads, hd).transpose(1, 2)
    if attention == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    elif attention == "eager":
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1,
                              dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)
    else:
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(b, t, d))
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    cls = None
    if cls_row:
        cls = torch.softmax(torch.matmul(q[:, :, :1], k.transpose(-1, -2)).float() * attn.scale,
                            dim=-1)[:, :, 0]  # float32: bf16 would tie near-equal scores
    return hidden, cls, q_flat, k_flat


def single_head_cls_score(q_cls: Tensor, k: Tensor) -> Tensor:
    """CLS query [B, 1, C] and all keys [B, T, C] -> float32 [B, T-1]: row 0 of ONE full-width head's
    softmax(q kᵀ * C**-0.5), CLS column dropped (ACCM clip_encoder.py L207-210: ``C`` there is the hidden
    width, ``image_features.shape[-1]``, L150). Equals the full [T, T] softmax's row 0: rows are independent."""
    c = k.shape[-1]
    logits = torch.matmul(q_cls.float(), k.float().transpose(-1, -2)) * c**-0.5  # [B, 1, T]
    return torch.softmax(logits, dim=-1)[:, 0, 1:]


@torch.no_grad()
def next_layer_cls_score(layer: nn.Module, hidden: Tensor) -> Tensor:
    """The single-head CLS score from ``layer``'s LN1 + q/k projections on its input ``hidden`` [B, T, C]
    (CLS first): ``k_proj`` on every token, ``q_proj`` on CLS only -> [B, T-1]."""
    x = layer.layer_norm1(hidden)
    return single_head_cls_score(layer.self_attn.q_proj(x[:, :1]), layer.self_attn.k_proj(x))


@torch.no_grad()
def project_tokens(projection: nn.Module, last_hidden: Tensor) -> Tensor:
    """Per-token CLIP embeddings of the last layer: ``visual_projection(post_layernorm(h))`` on every token.

    The one place this reading lives: ACCM reads ``image_embeds[:, 1:]`` (clip_encoder.py L161-162) from a
    non-public modified modeling_clip; applying post_layernorm + visual_projection to every token (then
    dropping CLS) is the reading implemented. ``projection``: anything with ``post_layernorm`` and
    ``visual_projection`` (``actors.pruners.TextGuide``, a ``CLIPModel``)."""
    w = projection.visual_projection.weight
    return projection.visual_projection(projection.post_layernorm(last_hidden.to(w.dtype)))


@torch.no_grad()
def encode_images(
    vision_tower: nn.Module,
    pixel_values: Tensor,
    *,
    feature_layer: int = -2,
    select_strategy: str = "default",
    projection: nn.Module | None = None,
    next_layer_score: bool = True,
    attention: str = "sdpa",
) -> VisionBatch:
    """Run a ``CLIPVisionModel`` once; features, CLS attention and head-mean keys of ``feature_layer``.

    ``next_layer_score``: also compute ``cls_attention_next`` (the next layer's LN1, ``k_proj`` on all
    tokens, ``q_proj`` on CLS). It is computed anyway (no extra projections) when ``projection`` is
    given, since then the next layer runs in full. If the feature layer is the LAST layer there is no
    next layer: the score then falls back to the feature layer's own q/k projections.
    ``projection``: compute ``projected`` [B, N, P] (``project_tokens`` on the last layer's output; every
    layer runs). ``attention``: "sdpa" (default) or "eager" (the reference), see ``_clip_layer``.
    """
    if select_strategy != "default":
        raise ValueError("only vision_feature_select_strategy='default' (CLS dropped) is supported")
    layers = vision_tower.encoder.layers
    n_run = feature_layer_count(len(layers), feature_layer)
    dtype = next(vision_tower.parameters()).dtype
    hidden = vision_tower.embeddings(pixel_values.to(dtype))
    hidden = vision_tower.pre_layrnorm(hidden)
    for layer in layers[: n_run - 1]:
        hidden = _clip_layer(layer, hidden, attention=attention)[0]
    hidden, cls_probs, q_flat, k_flat = _clip_layer(layers[n_run - 1], hidden, attention=attention, cls_row=True)
    b, t, _ = k_flat.shape
    heads = layers[n_run - 1].self_attn.num_heads
    cls_attention = cls_attention_scores(cls_probs[:, :, 1:])  # Triton on CUDA, reference on CPU
    score = projected = None
    if n_run == len(layers):  # no next layer: the feature layer's own q/k (already computed)
        last = hidden
        if next_layer_score or projection is not None:
            score = single_head_cls_score(q_flat[:, :1], k_flat)
    elif projection is not None:  # the next layer runs in full: take its q/k on the way
        last, _, q_next, k_next = _clip_layer(layers[n_run], hidden, attention=attention)
        score = single_head_cls_score(q_next[:, :1], k_next)
        for layer in layers[n_run + 1 :]:
            last = _clip_layer(layer, last, attention=attention)[0]
    elif next_layer_score:
        score = next_layer_cls_score(layers[n_run], hidden)
    if projection is not None:
        projected = project_tokens(projection, last)[:, 1:]
    return VisionBatch(
        patch_features=hidden[:, 1:],
        cls_attention=cls_attention,
        # VisionZip's merge metric: raw keys averaged over heads (VisionZip visionzip/utils.py L89,
        # ``raw_key_states.mean(1)`` on [B, H, T, head_dim])
        keys=k_flat.view(b, t, heads, -1).mean(2)[:, 1:],
        cls_feature=hidden[:, 0],
        cls_attention_next=score,
        projected=projected,
    )
