"""CDPruner: visual-token pruning by a conditional DPP (Zhang et al., 2025, arXiv 2506.10967).

Behaviour follows the public code (github Theia-4869/CDPruner, ``llava/model/llava_arch.py``,
``encode_images``, lines 141-187, and ``llava/model/multimodal_encoder/clip_encoder.py``); where the code
and the paper differ, the code's behaviour is the default and the paper's reading an option.

Rules and their sources (llava_arch.py unless said otherwise):

- Similarity ``S``: cosine similarity of the **projected** visual tokens, i.e. the mm_projector output
  the LLM sees (lines 148, 151-153: ``mm_projector(image_features)``, row-normalised, cast to float32,
  ``S = X X^T``). Normalisation happens in the input dtype, then float32 (lines 151-152).
- Relevance ``r`` (:func:`cdpruner_relevance`): CLIP's projected patch embeddings (clip_encoder.py:94-95:
  ``visual_projection(post_layernorm(hidden_states[select_layer][:, 1:]))``) against CLIP text embeddings
  of the instruction (clip_encoder.py:81-89; a long instruction is cut into 77-token segments, one text
  embedding each); both L2-normalised (lines 156-157), cosine (line 158), **negated** and averaged over
  the segments (line 159), then min-max normalised with ``+1e-6`` in the numerator only (line 160).
- Sign: the code negates the cosine (line 159), so the tokens **least** similar to the instruction get
  the **largest** ``r`` and are preferred. The paper defines relevance as the (normalised) similarity
  to the instruction, i.e. the opposite sign. The authors say the negation reflects a phenomenon they
  observed with LLaVA's CLIP (github Theia-4869/CDPruner issue #14, which points to issue #9). Default
  ``sign="code"``; ``sign="paper"`` drops the negation.
- Min-max scope: the code takes ``relevance.min()`` / ``.max()`` over the whole [B, N] tensor (line 160),
  where B is the images of one sample (1 for LLaVA-1.5: evaluation runs one question at a time). Here
  the rows of a batch are independent samples, so the default is per row (``normalize="row"``, equal to
  the code for LLaVA-1.5); ``normalize="batch"`` is the literal whole-tensor min-max.
- theta: the code has the theta transform only as a comment (lines 163-166: ``theta = 0.5``,
  ``alpha = theta / (2 * (1 - theta))``, ``r = exp(alpha * r)``); the running code uses ``r`` as is. The
  default ``theta=None`` is that running code; ``theta=0.5`` applies the commented transform. (The
  paper's exact LLaVA-1.5-7B theta could not be confirmed from the sources available here; the code
  is the default either way.)
- Kernel ``L = diag(r) S diag(r)`` (line 167).
- Greedy fast MAP (Chen et al. 2018) for ``keep`` steps (lines 170-181), see ``kernels/dpp_greedy.py``;
  kept indices sorted ascending (line 183).
- ``relevance=None`` (no text guide): not a path of the public code (its vision tower returns no
  embeddings without text); here the DPP then runs on ``S`` alone, i.e. a plain (unconditional) DPP.
- ``keep >= N`` keeps every token; ``keep <= 0`` keeps none.
"""

from __future__ import annotations

from typing import Literal

import torch

from actors.pruners import trivial_selection
from kernels.dpp_greedy import DEFAULT_EPS, dpp_greedy_map
from pipeline.flops_pruners import cdpruner_selection_flops as cdpruner_flops  # noqa: F401 - the one FLOPs model


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    # The code divides by the norm with no epsilon (lines 151, 156-157); the clamp only matters for an
    # all-zero vector, where the code would produce NaN.
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def cdpruner_relevance(
    text_embed: torch.Tensor,
    patch_embeds: torch.Tensor,
    *,
    sign: Literal["code", "paper"] = "code",
    normalize: Literal["row", "batch"] = "row",
) -> torch.Tensor:
    """Relevance ``r`` [B, N] float32 of each patch to the instruction (see the module docstring).

    ``text_embed``: CLIP text embedding(s) of the instruction, [B, D'] or [B, M, D'] (M 77-token
    segments, averaged as in llava_arch.py:159). ``patch_embeds``: CLIP projected patch embeddings
    [B, N, D'].
    """
    if sign not in ("code", "paper"):
        raise ValueError(f"sign must be 'code' or 'paper', got {sign!r}")
    if normalize not in ("row", "batch"):
        raise ValueError(f"normalize must be 'row' or 'batch', got {normalize!r}")
    if patch_embeds.dim() != 3:
        raise ValueError(f"patch_embeds must be [B, N, D'], got {tuple(patch_embeds.shape)}")
    text = text_embed.unsqueeze(1) if text_embed.dim() == 2 else text_embed
    if text.dim() != 3 or text.shape[0] != patch_embeds.shape[0] or text.shape[-1] != patch_embeds.shape[-1]:
        raise ValueError(f"text_embed must be [B, D'] or [B, M, D'], got {tuple(text_embed.shape)}")
    patches = _l2_normalise(patch_embeds.float())  # clip_encoder.py:95 (float), llava_arch.py:156
    text = _l2_normalise(text.float())  # llava_arch.py:157
    cos = torch.bmm(patches, text.transpose(1, 2))  # [B, N, M]; llava_arch.py:158
    rel = (-cos if sign == "code" else cos).mean(dim=-1)  # llava_arch.py:159 (code negates)
    if normalize == "row":
        lo = rel.amin(dim=-1, keepdim=True)
        hi = rel.amax(dim=-1, keepdim=True)
    else:
        lo, hi = rel.amin(), rel.amax()
    span = hi - lo
    # llava_arch.py:160, +1e-6 in the numerator only; a constant row (span 0, where the code divides
    # by zero) gets 1e-6 everywhere, i.e. uniform relevance.
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (rel - lo + 1e-6) / span


def cdpruner_kernel(
    features: torch.Tensor, relevance: torch.Tensor | None, *, theta: float | None = None
) -> torch.Tensor:
    """The conditional DPP kernel ``L = diag(r) S diag(r)`` [B, N, N] float32 (``S`` alone when relevance is None)."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got {tuple(features.shape)}")
    x = _l2_normalise(features).float()  # llava_arch.py:151-152: normalise in input dtype, then fp32
    sim = torch.bmm(x, x.transpose(1, 2))  # llava_arch.py:153
    if relevance is None:
        return sim
    if relevance.shape != features.shape[:2]:
        raise ValueError(
            f"relevance must be [B, N] = {tuple(features.shape[:2])}, got {tuple(relevance.shape)}"
        )
    r = relevance.to(device=sim.device, dtype=torch.float32)
    if theta is not None:  # llava_arch.py:163-166 (commented out in the public code)
        if not 0.0 <= theta < 1.0:
            raise ValueError(f"theta must lie in [0, 1), got {theta}")
        r = torch.exp(theta / (2.0 * (1.0 - theta)) * r)
    return r.unsqueeze(2) * sim * r.unsqueeze(1)  # llava_arch.py:167


def cdpruner_select(
    features: torch.Tensor,
    relevance: torch.Tensor | None,
    keep: int,
    *,
    theta: float | None = None,
    eps: float = DEFAULT_EPS,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Indices [B, keep'] (int64, ascending, keep' = clamp(keep, 0, N)) of the tokens CDPruner keeps.

    ``features``: the projected visual tokens [B, N, D] (llava_arch.py:148). ``relevance``: [B, N] from
    :func:`cdpruner_relevance` (its ``sign`` option picks code vs paper), or None for a plain DPP on the
    cosine similarity. ``theta``: None (the running code) or the commented-out exp weighting.
    ``use_kernel``: the greedy step's Triton kernel (default: CUDA tensors -> kernel).
    """
    keep, trivial = trivial_selection(features, keep)
    if trivial is not None:
        return trivial
    kernel = cdpruner_kernel(features, relevance, theta=theta)
    picks = dpp_greedy_map(kernel, keep, eps=eps, use_kernel=use_kernel)
    return torch.sort(picks, dim=-1).values  # llava_arch.py:183
