"""Analytic FLOPs model for the pipeline (skeleton; bodies land next commit).

Convention: 2 FLOPs per multiply-accumulate, causal attention counted in full, LM head only on the
positions actually computed. See the full docstring in the next commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TransformerDims:
    """Shape of a transformer stack; everything the FLOPs formulas need."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    gated_ffn: bool
    vocab: int = 0
    head_dim: int | None = None  # None -> hidden // heads

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads


def dims_from_config(config: Any) -> TransformerDims:
    raise NotImplementedError


def layer_flops(dims: TransformerDims, n_query: int, n_kv: int) -> float:
    raise NotImplementedError


def encoder_flops(dims: TransformerDims, n_tokens: int) -> float:
    raise NotImplementedError


def prefill_flops(dims: TransformerDims, n_tokens: int, *, lm_head_positions: int = 1) -> float:
    raise NotImplementedError


def decode_step_flops(dims: TransformerDims, kv_len: int, *, lm_head: bool = True) -> float:
    raise NotImplementedError


def decode_flops(dims: TransformerDims, prefill_len: int, new_tokens: int) -> float:
    raise NotImplementedError


def caption_model_flops(
    mapper_dims: TransformerDims,
    decoder_dims: TransformerDims,
    *,
    discarded_tokens: int,
    prefix_len: int,
    question_tokens: int,
    beams: int,
    caption_tokens: int,
    feature_dim: int | None = None,
) -> float:
    raise NotImplementedError


def selector_flops(
    text_dims: TransformerDims,
    classifier_dims: TransformerDims,
    *,
    candidates: int,
    tokens_per_candidate: int,
    projection_dim: int | None = None,
) -> float:
    raise NotImplementedError


def llava_item_flops(
    llava_config: Any,
    *,
    method: str,
    visual_tokens_total: int,
    visual_tokens_kept: int,
    prompt_tokens: int,
    new_tokens: int,
    caption_tokens: int = 0,
    fastv_layer: int = 2,
    captioner: dict | None = None,
    selector: dict | None = None,
) -> dict[str, float]:
    raise NotImplementedError
