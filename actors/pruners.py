"""Visual-token pruners that run before the LLM (SPEC §2): random, VisionZip, PruMerge+, CDPruner, DivPrune, none.

Every pruner returns a ``PrunedBatch``: which patches survive, their features (in ``kept_indices``'
order: ascending for random/VisionZip, ACCM's code order for PruMerge+ by default), and the discarded
patches, ascending (ACCM's caption model reads those). FastV prunes
inside the LLM instead (actors/fastv.py); before the projector it behaves like ``none``.

Top-k selection and scoring go through the ``kernels`` dispatch functions (Triton on CUDA, PyTorch
reference elsewhere) when that package provides them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from actors.prompt import plain_question
from actors.vision import VisionBatch
from kernels.topk_select import select_topk
from pipeline.config import IN_LLM_METHODS, METHODS, TEXT_PICKS  # one definition: the job's choices

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


def trivial_selection(features: Tensor, keep: int) -> tuple[int, Tensor | None]:
    """(keep clamped to [0, N], the kept indices when there is nothing to select: all or none; else None)
    for a greedy selector over ``features`` [B, N, D] (CDPruner, DivPrune)."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got {tuple(features.shape)}")
    batch, n, _ = features.shape
    keep = max(0, min(int(keep), n))
    if keep == n:
        return keep, torch.arange(n, device=features.device).expand(batch, n).clone()
    if keep == 0:
        return keep, torch.zeros((batch, 0), dtype=torch.int64, device=features.device)
    return keep, None


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

    # [B, k'] patch indices kept as themselves, in retained's order (k' = k except VisionZip): ascending
    # except PruMerge+'s default order="code" ([union, stride fill, random fill], ACCM clip_encoder.py L252-263)
    kept_indices: Tensor
    retained: Tensor  # [B, k, Dv] (VisionZip: [CLS, dominant patches, merged contextual tokens])
    # [B, N-k'] ascending, as ACCM's caption path reads them (``all_idx[~isin(all_idx, idx)]``, L272-274)
    discarded_indices: Tensor
    discarded: Tensor  # [B, N-k', Dv] input of ACCM's caption mapper
    notes: list[str] = field(default_factory=list)
    # [B, N-k', P] the discarded rows of VisionBatch.projected (ascending, not normalised; ACCM's reference
    # caption model reads these, L269-275); None when the vision stage computed no projected patches
    discarded_projected: Tensor | None = None

    @property
    def keep_tokens(self) -> int:
        return self.retained.shape[1]


def _discarded_projected(vision: VisionBatch, dropped: Tensor) -> Tensor | None:
    return None if vision.projected is None else gather_rows(vision.projected, dropped)


def _split(vision: VisionBatch, kept: Tensor, notes: list[str] | None = None) -> PrunedBatch:
    """Kept rows in ``kept``'s order; the others ascending."""
    feats = vision.patch_features
    dropped = complement(kept, feats.shape[1])
    return PrunedBatch(
        kept, gather_rows(feats, kept), dropped, gather_rows(feats, dropped), notes or [],
        _discarded_projected(vision, dropped),
    )  # fmt: skip


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
    Keys = the feature layer's keys averaged over heads, [B, N, head_dim] (VisionZip visionzip/utils.py
    L89 ``raw_key_states.mean(1)``, read as the metric in visionzip/clip_encoder.py L45, L64).
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
    return PrunedBatch(
        dominant, retained, rest, gather_rows(feats, rest), [], _discarded_projected(vision, rest)
    )


class TextGuide(nn.Module):
    """CLIP text tower + both CLIP projections: question embedding vs. projected patch embeddings.

    LLaVA checkpoints carry no CLIP text model, so PruMerge+'s text-guided picks need one loaded beside
    them (a ``CLIPModel`` whose vision width matches the LLaVA tower, e.g. openai/clip-vit-large-patch14-336).
    ``post_layernorm`` + ``visual_projection`` turn the tower's last layer into per-patch embeddings
    (actors.vision.project_tokens, run by encode_images when given this guide as ``projection``).
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

    def question_ids(self, question: str) -> list[int]:
        """Token ids of the plain question, as ACCM's side path sees it.

        First line only (ACCM's model_vqa_loader passes ``qs.split('\\n')[0]``, without the answer-format
        suffix); tokenized untruncated, then cut to ``max_length`` with EOS forced into the last slot
        (ACCM clip_encoder.py L171-176: ``input_ids[:, :77]``, ``input_ids[:, 76] = 49407``)."""
        ids = list(self.tokenizer(plain_question(question))["input_ids"])
        if len(ids) > self.max_length:
            ids = ids[: self.max_length]
            ids[-1] = self.tokenizer.eos_token_id
        return ids

    @torch.no_grad()
    def embed_questions(self, questions: list[str]) -> Tensor:
        """[B, P] L2-normalised ``text_embeds`` (text_projection of the pooled output), one question at a
        time as ACCM does (clip_encoder.py L170-180), so an item's embedding ignores its batch-mates."""
        dev = self.text_projection.weight.device
        out = []
        for q in questions:
            ids = torch.tensor([self.question_ids(q)], device=dev)
            pooled = self.text_model(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
            out.append(self.text_projection(pooled)[0])
        emb = torch.stack(out).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def flops_spec(self, questions: list[str]) -> list[dict]:
        """Per-question ``text_guide`` kwargs for pipeline.flops.pruner_flops (real token counts)."""
        from pipeline.flops import dims_from_config

        dims = dims_from_config(self.text_model.config)
        proj = self.text_projection.out_features
        return [
            {"text_dims": dims, "question_tokens": len(self.question_ids(q)), "projection_dim": proj}
            for q in questions
        ]


# ACCM's (kept visual tokens -> max_num_text) pairs: clip_encoder.py L152-153 ("144, 36, 18, 288, 72" /
# "70, 20, 12, 150, 40"); L77-78 set the 18 -> 12 default.
TEXT_PICK_TABLE = ((18, 12), (36, 20), (72, 40), (144, 70), (288, 150))
ORDERS = ("code", "ascending")


def text_pick_count(keep: int) -> int:
    """ACCM's ``topk_num`` for a budget: its table at 18/36/72/144/288 kept tokens; between those points
    linear in ``keep``, rounded; below 18 round(keep*12/18), above 288 round(keep*150/288) (our
    extension: the authors only ran the tabulated budgets)."""
    (k0, t0), (kn, tn) = TEXT_PICK_TABLE[0], TEXT_PICK_TABLE[-1]
    if keep <= k0:
        return round(keep * t0 / k0)
    if keep >= kn:
        return round(keep * tn / kn)
    for (a, ta), (b, tb) in zip(TEXT_PICK_TABLE, TEXT_PICK_TABLE[1:], strict=False):
        if a <= keep <= b:
            return round(ta + (tb - ta) * (keep - a) / (b - a))
    raise AssertionError("unreachable")


def iqr_outliers(scores: Tensor) -> Tensor:
    """ACCM's CLS picks: ``topk(int(N * ratio))`` of the scores, largest first, with ratio = the share of
    scores above Q3 + 1.5 IQR (clip_encoder.py L49-62 ``outlier_dectection``, L215-220). Quartiles by
    linear interpolation, as numpy.percentile's default (torch.quantile's default too)."""
    s = scores.detach().float().cpu().flatten()
    q1, q3 = torch.quantile(s.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    n = s.numel()
    ratio = int((s.double() > q3 + 1.5 * (q3 - q1)).sum()) / n  # L59-61
    return torch.topk(s, int(n * ratio), largest=True).indices  # L219


def text_picks(text_embed: Tensor, patch_embeds: Tensor, count: int, pick: str = "nearest") -> Tensor:
    """``count`` patches by squared L2 distance of L2-normalised embeddings (clip_encoder.py L186-190).

    ``farthest``: the code as written (``distances.topk(topk_num)``, default largest=True, L190);
    ``nearest``: the paper's reading (the patches closest to the question)."""
    if pick not in TEXT_PICKS:
        raise ValueError(f"text_pick must be one of {TEXT_PICKS}, got {pick!r}")
    t, p = text_embed.float(), patch_embeds.float()
    dist = (t**2).sum() + (p**2).sum(dim=-1) - 2.0 * (p @ t)  # L186-188
    return torch.topk(dist, count, largest=pick == "farthest").indices


def prumerge_plus_row(
    n: int, keep: int, text: Tensor | None, cls: Tensor, item_id: str, order: str = "code"
) -> Tensor:
    """One item's kept patch indices from its text picks and CLS outliers (ACCM clip_encoder.py L224-263).

    Union: cat(text, cls) -> unique (ascending); over budget -> the LAST ``keep`` (highest indices,
    L229-233). Fill: need = keep - len; stride ``arange(0, N, ceil(N / need))`` minus the chosen ones
    (L242-252); then random patches from the rest (L253-260; theirs is an unseeded randperm, ours is
    seeded by the item id). ``order="code"``: [union ascending, stride, random] as their code returns it;
    ``"ascending"``: sorted.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    picks = [cls.long().cpu()] if text is None else [text.long().cpu(), cls.long().cpu()]
    union = torch.unique(torch.cat(picks))  # sorted ascending
    if union.numel() > keep:
        union = union[-keep:]  # L232
    chosen = union.tolist()
    need = keep - len(chosen)
    if need > 0:
        step = math.ceil(n / need)  # L246
        have = set(chosen)
        chosen += [j for j in range(0, n, step) if j not in have]  # L247-252
    if len(chosen) < keep:
        have = set(chosen)
        rest = [j for j in range(n) if j not in have]  # ascending, as all_index[mask] (L255-256)
        perm = torch.randperm(len(rest), generator=item_generator(item_id))[: keep - len(chosen)]
        chosen += [rest[j] for j in perm.tolist()]  # L258-260
    row = torch.tensor(chosen, dtype=torch.long)
    return row.sort().values if order == "ascending" else row


def prune_prumerge_plus(
    vision: VisionBatch,
    keep: int,
    item_ids: list[str],
    questions: list[str],
    text_guide: TextGuide | None = None,
    *,
    text_pick: str = "nearest",
    order: str = "code",
) -> PrunedBatch:
    """ACCM's base pruner, ``token_prune_merge_advanced_plus`` (ACCM clip_encoder.py L132-265). No merging.

    (1) text picks: ``text_pick_count(keep)`` patches by distance between the question's CLIP text
    embedding and the last layer's projected patches (``vision.projected``; only with a ``text_guide``);
    (2) CLS picks: IQR outliers of ``vision.cls_attention_next`` (one full-width head of the next layer);
    (3) union, stride fill, random fill (``prumerge_plus_row``). ``kept_indices`` follow ``retained``'s
    order (``order``); ``discarded_indices`` are ascending.
    """
    if text_pick not in TEXT_PICKS:
        raise ValueError(f"text_pick must be one of {TEXT_PICKS}, got {text_pick!r}")
    if vision.cls_attention_next is None:
        raise ValueError(
            "prumerge_plus needs VisionBatch.cls_attention_next (the next layer's single-head CLS score): "
            "encode with actors.vision.encode_images(next_layer_score=True) or prune through LlavaEngine.prune"
        )
    feats = vision.patch_features
    b, n, _ = feats.shape
    notes = []
    text_rows: list[Tensor | None] = [None] * b
    if text_guide is not None:
        if vision.projected is None:
            raise ValueError(
                "a text guide needs VisionBatch.projected (encode_images(..., projection=text_guide))"
            )
        text = text_guide.embed_questions(questions).cpu()
        patches = vision.projected.detach().float().cpu()
        patches = patches / patches.norm(dim=-1, keepdim=True)  # L163
        count = min(n, text_pick_count(keep))
        text_rows = [text_picks(text[i], patches[i], count, text_pick) for i in range(b)]
    else:
        notes.append("prumerge_plus: no CLIP text model, text-guided part skipped")
    cls_scores = vision.cls_attention_next
    rows = [
        prumerge_plus_row(n, keep, text_rows[i], iqr_outliers(cls_scores[i]), item_ids[i], order)
        for i in range(b)
    ]
    return _split(vision, torch.stack(rows).to(feats.device), notes)


def prune_cdpruner(vision: VisionBatch, keep: int, llm_tokens: Tensor, questions: list[str],
                   text_guide: TextGuide | None, sign: str = "code") -> PrunedBatch:
    """CDPruner (actors/cdpruner.py): a conditional DPP over the projected tokens the LLM would read
    (``llm_tokens``, CDPruner's llava_arch.py:148), conditioned on the question's CLIP relevance when a text
    guide and CLIP's projected patches exist; otherwise the DPP on the tokens' similarity alone."""
    from actors.cdpruner import cdpruner_relevance, cdpruner_select

    relevance = None
    if text_guide is not None and vision.projected is not None:
        text = text_guide.embed_questions(questions).to(vision.projected.device)
        relevance = cdpruner_relevance(text, vision.projected, sign=sign)
    return _split(vision, cdpruner_select(llm_tokens, relevance, keep))


def prune_divprune(vision: VisionBatch, keep: int, llm_tokens: Tensor) -> PrunedBatch:
    """DivPrune (actors/divprune.py): greedy max-min diversity over the projected tokens, text-agnostic."""
    from actors.divprune import divprune_select

    return _split(vision, divprune_select(llm_tokens, keep))


def prune(
    vision: VisionBatch,
    method: str,
    keep_tokens: int,
    item_ids: list[str],
    questions: list[str],
    text_guide: TextGuide | None = None,
    *,
    text_pick: str = "nearest",
    order: str = "code",
    llm_tokens: Tensor | None = None,
    cdpruner_sign: str = "code",
) -> PrunedBatch:
    """Dispatch on ``method`` (one of METHODS). ``fastv``, ``dart`` and ``none`` keep every patch here.

    ``text_pick`` ("nearest" | "farthest") and ``order`` ("code" | "ascending"): PruMerge+/ACCM only.
    ``llm_tokens``: the patches through LLaVA's projector [B, N, d], which CDPruner and DivPrune compare."""
    if text_pick not in TEXT_PICKS:
        raise ValueError(f"text_pick must be one of {TEXT_PICKS}, got {text_pick!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    n = vision.patch_features.shape[1]
    keep = resolve_keep_tokens(n, keep_tokens)
    if method == "none" or method in IN_LLM_METHODS or keep >= n and method != "visionzip":
        return prune_none(vision)
    if method == "random":
        return prune_random(vision, keep, item_ids)
    if method in ("cdpruner", "divprune"):
        if llm_tokens is None:
            raise ValueError(f"{method} compares the projected tokens: pass llm_tokens")
        if method == "divprune":
            return prune_divprune(vision, keep, llm_tokens)
        return prune_cdpruner(vision, keep, llm_tokens, questions, text_guide, cdpruner_sign)
    if method == "visionzip":
        return prune_visionzip(vision, keep)
    return prune_prumerge_plus(
        vision, keep, item_ids, questions, text_guide, text_pick=text_pick, order=order
    )
