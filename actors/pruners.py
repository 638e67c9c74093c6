"""Visual-token pruners that run before the projector (SPEC §2): random, VisionZip, PruMerge+ and none.

Every pruner returns a ``PrunedBatch``: which patches survive (ascending, so the LLM sees them in image
order), their features, and the discarded patches (ACCM's caption model reads those). FastV prunes
inside the LLM instead (actors/fastv.py); before the projector it behaves like ``none``.

Top-k selection and scoring go through the ``kernels`` dispatch functions (Triton on CUDA, PyTorch
reference elsewhere) when that package provides them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from actors.vision import VisionBatch
from kernels.token_scores import cosine_scores
from kernels.topk_select import select_topk

METHODS = ("none", "random", "fastv", "visionzip", "prumerge_plus", "accm")  # accm prunes like prumerge_plus
VISIONZIP_SPLIT = (54, 10)  # dominant : contextual, VisionZip's 64-token setting (scaled to any budget)


# ----------------------------------------------------------------------------------------------------
# small ops (scoring and top-k come from kernels/: Triton on CUDA, their PyTorch references on CPU)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, N, D], idx [B, k] -> [B, k, D]."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def complement(idx: Tensor, n: int) -> Tensor:
    """[B, k] kept indices -> [B, n-k] the others, ascending."""
    mask = torch.ones(idx.shape[0], n, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, idx, False)
    return mask.nonzero()[:, 1].view(idx.shape[0], n - idx.shape[1])


def item_generator(item_id: str) -> torch.Generator:
    """A CPU generator seeded from the item id (stable across processes, unlike ``hash()``)."""
    seed = int.from_bytes(hashlib.sha256(str(item_id).encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# budget


def resolve_keep_tokens(total: int, keep_tokens: int | None = None, prune_rate: float | None = None) -> int:
    """Visual tokens to keep from a count or a pruning rate (fraction removed); neither means all."""
    if keep_tokens is not None and prune_rate is not None:
        raise ValueError("give keep_tokens or prune_rate, not both")
    if prune_rate is not None:
        if not 0.0 <= prune_rate < 1.0:
            raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
        keep_tokens = round(total * (1.0 - prune_rate))
    if keep_tokens is None:
        return total
    if keep_tokens < 1:
        raise ValueError(f"keep_tokens must be >= 1, got {keep_tokens}")
    return min(int(keep_tokens), total)


# ----------------------------------------------------------------------------------------------------
# results


@dataclass
class PrunedBatch:
    """Pruner output. ``retained`` is what the projector sees (k rows per item)."""

    kept_indices: Tensor  # [B, k'] ascending patch indices kept as themselves (k' = k except VisionZip)
    retained: Tensor  # [B, k, Dv] (VisionZip: [CLS, dominant patches, merged contextual tokens])
    discarded_indices: Tensor  # [B, N-k'] ascending
    discarded: Tensor  # [B, N-k', Dv] input of ACCM's caption mapper
    notes: list[str] = field(default_factory=list)

    @property
    def keep_tokens(self) -> int:
        return self.retained.shape[1]


def _split(vision: VisionBatch, kept: Tensor, notes: list[str] | None = None) -> PrunedBatch:
    feats = vision.patch_features
    dropped = complement(kept, feats.shape[1])
    return PrunedBatch(kept, gather_rows(feats, kept), dropped, gather_rows(feats, dropped), notes or [])


# ----------------------------------------------------------------------------------------------------
# pruners


def prune_none(vision: VisionBatch) -> PrunedBatch:
    b, n, _ = vision.patch_features.shape
    kept = torch.arange(n, device=vision.patch_features.device).expand(b, n).contiguous()
    return _split(vision, kept)


def prune_random(vision: VisionBatch, keep: int, item_ids: list[str]) -> PrunedBatch:
    """k uniformly random patches per item; the draw depends only on the item id (reruns agree)."""
    n = vision.patch_features.shape[1]
    rows = [torch.randperm(n, generator=item_generator(i))[:keep].sort().values for i in item_ids]
    return _split(vision, torch.stack(rows).to(vision.patch_features.device))


def visionzip_split(keep: int) -> tuple[int, int]:
    """(dominant D incl. CLS, contextual C) with D + C = keep, in VisionZip's 54:10 proportion.

    54+10 / 108+20 / 162+30 for 64 / 128 / 192; at least one contextual token once keep > 1
    (the same rule as pipeline.flops.visionzip_contextual_tokens).
    """
    dom, ctx = VISIONZIP_SPLIT
    c = max(1, round(keep * ctx / (dom + ctx))) if keep > 1 else 0
    return keep - c, c


def prune_visionzip(vision: VisionBatch, keep: int) -> PrunedBatch:
    """VisionZip: CLS + top (D-1) patches by CLS attention, the rest merged into C contextual tokens.

    Contextual: among the non-dominant patches, C evenly strided ones are targets; every other patch is
    assigned to its most key-cosine-similar target and averaged into it (target + mean of its group).
    """
    if vision.keys is None or vision.cls_feature is None:
        raise ValueError(
            "visionzip needs the feature layer's keys and CLS feature (VisionBatch.keys/cls_feature)"
        )
    feats = vision.patch_features
    b, n, dv = feats.shape
    d, c = visionzip_split(keep)
    dominant = select_topk(vision.cls_attention, d - 1)  # [B, D-1] ascending
    rest = complement(dominant, n)  # [B, M]
    parts = [vision.cls_feature[:, None, :], gather_rows(feats, dominant)]
    m = rest.shape[1]
    if c > 0 and m > 0:
        c = min(c, m)
        rest_feats = gather_rows(feats, rest)
        metric = gather_rows(vision.keys, rest).float()
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        step = max(1, m // c)
        targets = torch.arange(0, m, step, device=feats.device)[:c]
        is_target = torch.zeros(m, dtype=torch.bool, device=feats.device)
        is_target[targets] = True
        sources = (~is_target).nonzero()[:, 0]
        sim = metric[:, sources] @ metric[:, targets].transpose(1, 2)  # [B, S, C]
        assign = sim.argmax(dim=2)  # [B, S] target of each source token
        summed = torch.zeros(b, c, dv, dtype=torch.float32, device=feats.device)
        summed.scatter_add_(1, assign[..., None].expand(-1, -1, dv), rest_feats[:, sources].float())
        counts = torch.zeros(b, c, device=feats.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float32)
        )
        merged = summed / counts.clamp_min(1.0)[..., None]
        parts.append((rest_feats[:, targets].float() + merged).to(feats.dtype))
    retained = torch.cat(parts, dim=1)
    return PrunedBatch(dominant, retained, rest, gather_rows(feats, rest), [])


class TextGuide(nn.Module):
    """CLIP text tower + both CLIP projections: question embedding vs. projected patch embeddings.

    LLaVA checkpoints carry no CLIP text model, so PruMerge+'s text-guided picks need one loaded beside
    them (a ``CLIPModel`` whose vision width matches the LLaVA tower, e.g. openai/clip-vit-large-patch14-336).
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Any, *, max_length: int = 77):
        super().__init__()
        self.text_model = clip_model.text_model
        self.text_projection = clip_model.text_projection
        self.post_layernorm = clip_model.vision_model.post_layernorm
        self.visual_projection = clip_model.visual_projection
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32) -> TextGuide:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
        return cls(model, AutoTokenizer.from_pretrained(path))

    @torch.no_grad()
    def embed_text(self, questions: list[str]) -> Tensor:
        enc = self.tokenizer(
            questions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        enc = {k: v.to(self.text_projection.weight.device) for k, v in enc.items()}
        pooled = self.text_model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).pooler_output
        return self.text_projection(pooled)

    def flops_spec(self, questions: list[str]) -> list[dict]:
        """Per-question ``text_guide`` kwargs for pipeline.flops.pruner_flops."""
        from pipeline.flops import dims_from_config

        dims = dims_from_config(self.text_model.config)
        ids = self.tokenizer(questions, truncation=True, max_length=self.max_length)["input_ids"]
        proj = self.text_projection.out_features
        return [{"text_dims": dims, "question_tokens": len(x), "projection_dim": proj} for x in ids]

    @torch.no_grad()
    def project_patches(self, patch_features: Tensor) -> Tensor:
        return self.visual_projection(
            self.post_layernorm(patch_features.to(self.visual_projection.weight.dtype))
        )

    @torch.no_grad()
    def scores(self, patch_features: Tensor, questions: list[str]) -> Tensor:
        """[B, N] cosine similarity of each patch to its item's question."""
        return cosine_scores(self.project_patches(patch_features), self.embed_text(questions))


def iqr_outliers(scores: Tensor) -> Tensor:
    """Indices (descending by score) of entries above Q3 + 1.5 IQR."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    hits = (scores > q3 + 1.5 * (q3 - q1)).nonzero()[:, 0]
    return hits[torch.argsort(scores[hits], descending=True, stable=True)]


def _add_new(chosen: list[int], candidates: Tensor, limit: int) -> None:
    """Append candidates not yet chosen, in order, until ``chosen`` holds ``limit``."""
    seen = set(chosen)
    for j in candidates.tolist():
        if len(chosen) >= limit:
            return
        if j not in seen:
            seen.add(j)
            chosen.append(j)


def prune_prumerge_plus(
    vision: VisionBatch,
    keep: int,
    item_ids: list[str],
    questions: list[str],
    text_guide: TextGuide | None = None,
    *,
    text_fraction: float = 0.25,
) -> PrunedBatch:
    """ACCM's base pruner (SPEC §1.1): text-guided picks, CLS-attention IQR outliers, stride fill, random fill.

    Order of precedence, each step only adding new patches while budget is left: (a) the
    ``round(keep * text_fraction)`` patches most similar to the question (only with a ``text_guide``);
    (b) CLS-attention outliers, strongest first; (c) patches on an even stride over the image; (d)
    random patches (seeded by item id). No merging.
    """
    feats = vision.patch_features
    b, n, _ = feats.shape
    notes = []
    text_scores = None
    if text_guide is not None:
        text_scores = text_guide.scores(feats, questions).float()
    else:
        notes.append("prumerge_plus: no CLIP text model, text-guided part skipped")
    rows = []
    for i in range(b):
        chosen: list[int] = []
        if text_scores is not None:
            n_text = min(keep, round(keep * text_fraction))
            _add_new(chosen, torch.argsort(text_scores[i].cpu(), descending=True, stable=True), n_text)
        _add_new(chosen, iqr_outliers(vision.cls_attention[i].cpu()), keep)
        need = keep - len(chosen)
        if need > 0:
            _add_new(chosen, (torch.arange(need) * n) // need + (n // need) // 2, keep)
        if len(chosen) < keep:
            _add_new(chosen, torch.randperm(n, generator=item_generator(item_ids[i])), keep)
        rows.append(torch.tensor(sorted(chosen)))
    return _split(vision, torch.stack(rows).to(feats.device), notes)


def prune(
    vision: VisionBatch,
    method: str,
    keep_tokens: int,
    item_ids: list[str],
    questions: list[str],
    text_guide: TextGuide | None = None,
) -> PrunedBatch:
    """Dispatch on ``method`` (one of METHODS). ``fastv`` and ``none`` keep every patch here."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    n = vision.patch_features.shape[1]
    keep = resolve_keep_tokens(n, keep_tokens)
    if method in ("none", "fastv") or keep >= n and method != "visionzip":
        return prune_none(vision)
    if method == "random":
        return prune_random(vision, keep, item_ids)
    if method == "visionzip":
        return prune_visionzip(vision, keep)
    return prune_prumerge_plus(vision, keep, item_ids, questions, text_guide)
