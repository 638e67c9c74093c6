"""The one analytic FLOPs model of the pipeline: every item's cost, per component, from model configs.

Convention ("ours"), used for every method so that methods compare fairly:

* 2 FLOPs per multiply-accumulate (a [n, a] x [a, b] matmul costs 2*n*a*b).
* Per transformer layer, n_q query tokens attending n_kv positions, hidden d, head_dim h, H query heads,
  G key/value heads (GQA), FFN width m:
    - projections  q: 2*n_q*d*H*h   k, v: 2 * 2*n_q*d*G*h   o: 2*n_q*H*h*d
    - attention    QK^T: 2*n_q*n_kv*H*h   AV: 2*n_q*n_kv*H*h
    - FFN          gated (LLaMA, 3 matrices): 3 * 2*n_q*d*m;  plain (GPT-2, CLIP, 2 matrices): 2 * 2*n_q*d*m
  Causal attention is counted in full (n^2, as eager attention computes it and FlopCounterMode counts it).
* LM head (2*d*vocab per position) only on the positions actually computed: a prefill inside `generate`
  computes logits for the last position only (transformers' `logits_to_keep=1`), so the default is 1;
  a plain forward computes all n (pass `lm_head_positions=n`).
* Decode: `generate(max_new_tokens=T)` runs the prefill (which yields token 1) and T-1 cached forwards;
  step t = 1..T-1 feeds token t with n+t-1 positions cached, so it attends n+t positions.
* Ignored: norms, softmax, activations, rotary embeddings, biases, residual adds, embedding lookups,
  position-embedding adds. FlopCounterMode counts only matmuls/convolutions, so this is the same scope;
  the elementwise work is well under 1% of the matmul FLOPs at these widths (tests check 2% agreement).
* Vision tower (CLIP): patch-embedding convolution (2 * patches * 3*p*p * d) plus the encoder layers run,
  on patches+CLS. `vision_tower_flops` defaults to *all* layers: transformers 5.23's
  `LlavaModel.get_image_features` runs the full CLIPEncoder although LLaVA reads layer -2 (the Llava test
  checks this against FlopCounterMode). The job (actors.engine) and the CLI count the layers the engine
  runs (`vision_layers_run`): up to the feature layer (23 of 24 for -2), or every layer when PruMerge+'s
  text-guided picks need the last layer's projected patches (a CLIP text model is loaded).
* Projector: LLaVA's 2-layer MLP on the visual tokens that enter it (the kept ones for pruners that act
  before the projector; all of them for `fastv`, which prunes inside the LLM).
* Pruner scoring is counted, though small: head-summing CLS/last-token attention (H*N adds), VisionZip's
  head-mean-key cosine similarity for contextual merging (2*(R-C)*C*head_dim + merge adds), PruMerge+'s
  single-head CLS score of the layer after the feature layer (`cls_score_flops`: k_proj on all tokens +
  q_proj of CLS + one score row; the row only when that layer ran in full) and its text-guided part
  (CLIP text encoder on the question + patch projection + distances, only where a text tower exists).
* FastV: layers < K see every visual token (prefill and their KV cache), layers >= K only the kept ones.

FastV's own convention (its §4.2) counts one layer as 4nd^2 + 2n^2d + 2ndm multiply-accumulates and only
the LLM prefill: no factor 2, no GQA, a 2-matrix FFN (LLaMA has 3), no decode, no vision tower, no LM
head. Its theoretical reduction for K=2, R=50% on LLaVA-1.5-7B comes out at ~45% (with ~30 text tokens);
ours reports whole-item totals, in which the unprunable vision tower and the 3-matrix FFN shift the
ratio by a few points. `fastv_convention_flops` reproduces the paper's figure (`--convention fastv`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import IN_LLM_METHODS, METHODS  # the one list
from pipeline.flops_pruners import cdpruner_selection_flops, dart_selection_flops, divprune_selection_flops

GATED_FFN_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "vicuna"}
# "additional information: " as the LLaMA tokenizer splits it, added to the LLM prefill with a caption.
CAPTION_SPLICE_TOKENS = 4
DEFAULT_CAPTION_TOKENS = 36  # the ACCM paper's caption budget (GPT-2 decoding stops at '.' or here)


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
    """Dims of a LlamaConfig / CLIPVisionConfig / CLIPTextConfig / GPT2Config (or a look-alike)."""
    model_type = getattr(config, "model_type", "")
    if model_type == "gpt2" or hasattr(config, "n_embd"):
        d = config.n_embd
        return TransformerDims(
            hidden=d,
            intermediate=config.n_inner or 4 * d,
            layers=config.n_layer,
            heads=config.n_head,
            kv_heads=config.n_head,
            gated_ffn=False,
            vocab=config.vocab_size,
        )
    if hasattr(config, "text_config") and hasattr(config, "vision_config"):
        raise ValueError("pass llava_config.text_config or .vision_config, not the composite config")
    heads = config.num_attention_heads
    clip_like = model_type.startswith("clip") or "clip" in type(config).__name__.lower()
    gated = model_type in GATED_FFN_MODEL_TYPES or (
        not clip_like and getattr(config, "hidden_act", "") in ("silu", "swish")
    )
    return TransformerDims(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        gated_ffn=gated,
        # CLIP has no LM head (its vocab only feeds an embedding lookup).
        vocab=0 if clip_like else getattr(config, "vocab_size", 0),
        head_dim=getattr(config, "head_dim", None),
    )


# --------------------------------------------------------------------------- transformer stacks


def layer_flops(dims: TransformerDims, n_query: int, n_kv: int) -> float:
    """One layer: n_query new tokens attending n_kv positions (n_kv = n_query for a full forward)."""
    d, h = dims.hidden, dims.hd
    q_width, kv_width = dims.heads * h, dims.kv_heads * h
    projections = 2 * n_query * d * (q_width + 2 * kv_width) + 2 * n_query * q_width * d
    attention = 2 * 2 * n_query * n_kv * q_width
    ffn = (3 if dims.gated_ffn else 2) * 2 * n_query * d * dims.intermediate
    return float(projections + attention + ffn)


def lm_head_flops(dims: TransformerDims, positions: int = 1) -> float:
    return 2.0 * positions * dims.hidden * dims.vocab


def encoder_flops(dims: TransformerDims, n_tokens: int) -> float:
    """Bidirectional stack (CLIP vision/text, a mapper, a classifier body), no head."""
    return dims.layers * layer_flops(dims, n_tokens, n_tokens)


def prefill_flops(dims: TransformerDims, n_tokens: int, *, lm_head_positions: int = 1) -> float:
    """Causal LM forward over n_tokens (attention counted in full) + LM head on lm_head_positions."""
    return encoder_flops(dims, n_tokens) + lm_head_flops(dims, lm_head_positions)


def decode_step_flops(dims: TransformerDims, kv_len: int, *, lm_head: bool = True) -> float:
    """One new token with kv_len positions cached: it attends kv_len + 1 positions."""
    return dims.layers * layer_flops(dims, 1, kv_len + 1) + (lm_head_flops(dims) if lm_head else 0.0)


def decode_flops(dims: TransformerDims, prefill_len: int, new_tokens: int) -> float:
    """The new_tokens - 1 cached forwards of generate after a prefill of prefill_len tokens."""
    return sum(decode_step_flops(dims, prefill_len + t - 1) for t in range(1, new_tokens))


# --------------------------------------------------------------------------- LLaVA parts


def _num_feature_layers(llava_config: Any) -> int:
    """How many feature layers LLaVA concatenates into the projector's input (1 for an int layer)."""
    layer = getattr(llava_config, "vision_feature_layer", -2)
    return 1 if isinstance(layer, int) else len(layer)


def vision_layers_run(llava_config: Any, *, projected: bool = False) -> int:
    """Encoder layers the engine runs in full (actors.vision.encode_images): up to the (deepest) feature
    layer; every layer when it computes the last layer's projected patches (``projected``)."""
    total = llava_config.vision_config.num_hidden_layers
    if projected:
        return total
    layer = getattr(llava_config, "vision_feature_layer", -2)
    deepest = max(x if x >= 0 else total + 1 + x for x in ([layer] if isinstance(layer, int) else layer))
    return min(max(deepest, 1), total)


def patch_projection_flops(vision_config: Any, projection_dim: int) -> float:
    """visual_projection on every token (patches + CLS) of the last layer (actors.vision.project_tokens)."""
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
    return 2.0 * tokens * vision_config.hidden_size * projection_dim


def cls_score_flops(llava_config: Any, *, projected: bool = False) -> float:
    """PruMerge+'s single-head CLS score: softmax(q_cls kᵀ / sqrt(C)) over all T tokens, C = hidden width.

    One score row (2*T*C). The q/k come from the layer after the feature layer: when that layer ran in
    full (``projected``) or the feature layer is the last one (its own q/k), they are already counted in
    the tower; otherwise k_proj on all T tokens (2*T*C*C) + q_proj of CLS (2*C*C) are the pruner's."""
    vision = llava_config.vision_config
    c = vision.hidden_size
    t = (vision.image_size // vision.patch_size) ** 2 + 1
    row = 2.0 * t * c
    full = projected or vision_layers_run(llava_config) >= vision.num_hidden_layers
    return row if full else row + 2.0 * t * c * c + 2.0 * c * c


def vision_tower_flops(vision_config: Any, *, layers: int | None = None) -> float:
    """CLIP vision tower on one image: patch-embedding conv + every encoder layer on patches + CLS.

    layers: how many encoder layers actually run (default all, as transformers' Llava does; an engine
    that stops at the feature layer passes e.g. num_hidden_layers - 1).
    """
    dims = dims_from_config(vision_config)
    if layers is not None:
        dims = replace(dims, layers=layers)
    patch = vision_config.patch_size
    patches = (vision_config.image_size // patch) ** 2
    conv = 2.0 * patches * getattr(vision_config, "num_channels", 3) * patch * patch * dims.hidden
    return conv + encoder_flops(dims, patches + 1)


def projector_flops(llava_config: Any, n_tokens: int) -> float:
    """LLaVA's MLP projector (linear_1: Dv*layers -> D, linear_2: D -> D) on n_tokens visual tokens."""
    dv = llava_config.vision_config.hidden_size * _num_feature_layers(llava_config)
    d = llava_config.text_config.hidden_size
    return 2.0 * n_tokens * (dv * d + d * d)


def visionzip_contextual_tokens(keep_tokens: int) -> int:
    """VisionZip's contextual share of the budget (54+10 / 108+20 / 162+30 for 64 / 128 / 192)."""
    return max(1, round(keep_tokens * 10 / 64)) if keep_tokens > 1 else 0


def pruner_flops(
    llava_config: Any,
    *,
    method: str,
    visual_tokens_total: int,
    visual_tokens_kept: int,
    visionzip_contextual: int | None = None,
    text_guide: dict | None = None,
    projected: bool | None = None,
) -> float:
    """Scoring/merging cost of a pruner. Attention maps themselves are already counted in their layers.

    `text_guide` (PruMerge+/ACCM text-guided picks) = {"text_dims": TransformerDims, "question_tokens": int,
    "projection_dim": int}; None where the checkpoint has no CLIP text model (that part is then skipped).
    `projected`: the tower ran every layer for projected patches (default: a text guide is given), so the
    single-head CLS score's q/k are already counted there (see cls_score_flops).
    """
    n = visual_tokens_total
    vision = llava_config.vision_config
    if method in ("none", "random"):
        return 0.0
    if method == "fastv":
        # Head-average of the last token's attention row over the visual tokens (top-k selection ignored).
        return float(llava_config.text_config.num_attention_heads * n)
    if method == "dart":  # key norms + similarity to the 4 + 4 pivots (actors/dart.py), ~4 text tokens after the image
        text = llava_config.text_config
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        kv_dim = heads * (text.hidden_size // text.num_attention_heads)
        return dart_selection_flops(n, text.hidden_size, 8, kv_dim=kv_dim, n_text=4) if visual_tokens_kept < n else 0.0
    head_sum = float(vision.num_attention_heads * n)  # CLS attention summed over heads
    if method == "visionzip":
        contextual = (
            visionzip_contextual_tokens(visual_tokens_kept)
            if visionzip_contextual is None
            else visionzip_contextual
        )
        remaining = n - (visual_tokens_kept - contextual)  # not dominant
        merged = max(remaining - contextual, 0)
        # the merge metric: keys averaged over heads (head_dim wide, VisionZip utils.py L89)
        metric = vision.hidden_size // vision.num_attention_heads
        return head_sum + 2.0 * merged * contextual * metric + merged * vision.hidden_size
    if method in ("cdpruner", "divprune"):
        if visual_tokens_kept >= n:
            return 0.0  # every patch kept: nothing ran
        # both compare the tokens the LLM would read: the projector on all N (the kept ones are projected again
        # in the LVLM tier, counted there), then their own selection (CDPruner's llava_arch.py:148; DivPrune's :374)
        cost = projector_flops(llava_config, n)
        d = llava_config.text_config.hidden_size
        if method == "divprune":
            return cost + divprune_selection_flops(n, d, visual_tokens_kept)
        proj = (text_guide.get("projection_dim") or text_guide["text_dims"].hidden) if text_guide else 0
        cost += cdpruner_selection_flops(n, d, visual_tokens_kept, conditional=bool(text_guide), text_dim=proj)
        if text_guide:  # the question through CLIP's text tower, the last layer's patches into the joint space
            tdims = text_guide["text_dims"]
            cost += encoder_flops(tdims, text_guide["question_tokens"]) + 2.0 * tdims.hidden * proj
            cost += patch_projection_flops(vision, proj)
        return cost
    if method in ("prumerge_plus", "accm"):
        if projected is None:
            projected = bool(text_guide)
        cost = cls_score_flops(llava_config, projected=projected)
        if text_guide:
            tdims: TransformerDims = text_guide["text_dims"]
            proj = text_guide.get("projection_dim") or tdims.hidden
            q = text_guide["question_tokens"]
            cost += encoder_flops(tdims, q) + 2.0 * tdims.hidden * proj  # text tower + text_projection (EOS)
            cost += patch_projection_flops(vision, proj)  # last layer -> joint space (visual_projection)
            cost += 2.0 * n * proj  # squared distances: the text . patch matmul
        return cost
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# --------------------------------------------------------------------------- ACCM slots


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
    prefill_copies: int = 1,
    lm_head_positions: int = 1,
    patch_prefix: bool = False,
) -> float:
    """ACCM caption model: mapper + decoder prefill + beam-search decode with a KV cache.

    Mapper: Linear(feature_dim -> mapper hidden) on every discarded patch, then a bidirectional stack over
    [discarded ; learned prefix constants]. Decoder: prefill over [question ; prefix] (prefill_copies = 1
    when the prefix is computed once and the cache replicated to the beams, = beams for HF generate,
    which expands inputs first), then caption_tokens - 1 steps, each = beams x decode_step.
    ``patch_prefix``: the decoder's prefix is every mapper output (discarded_tokens + prefix_len slots).
    """
    feature_dim = feature_dim or mapper_dims.hidden
    mapper = 2.0 * discarded_tokens * feature_dim * mapper_dims.hidden
    mapper += encoder_flops(mapper_dims, discarded_tokens + prefix_len)
    n0 = question_tokens + prefix_len + (discarded_tokens if patch_prefix else 0)
    prefill = prefill_copies * prefill_flops(decoder_dims, n0, lm_head_positions=lm_head_positions)
    decode = beams * decode_flops(decoder_dims, n0, caption_tokens)
    return mapper + prefill + decode


def selector_flops(
    text_dims: TransformerDims,
    classifier_dims: TransformerDims,
    *,
    candidates: int,
    tokens_per_candidate: int,
    projection_dim: int | None = None,
    shared_prefix_tokens: int = 0,
) -> float:
    """ACCM selector: CLIP text encoder per candidate (+ text_projection on the EOS feature), then a small
    encoder over the candidate vectors and a Linear(d -> 1) per candidate.

    ``shared_prefix_tokens`` P > 0 (``SelectorConfig.share_prefix``, actors/shared_prefix.py): the candidates'
    common prefix runs once (a full forward of P tokens) and each candidate's ``tokens_per_candidate`` suffix
    tokens attend to P + suffix positions. One candidate (``--num-candidates 1``) has nothing to choose: the
    selector does not run (``ACCMCaptioner.caption``) and costs 0."""
    if candidates <= 1:
        return 0.0
    p, s = shared_prefix_tokens, tokens_per_candidate
    text = (sum(layer_flops(text_dims, s, p + s) for _ in range(text_dims.layers)) if p
            else encoder_flops(text_dims, s))
    if projection_dim:
        text += 2.0 * text_dims.hidden * projection_dim
    classifier = encoder_flops(classifier_dims, candidates) + 2.0 * candidates * classifier_dims.hidden
    prefix = encoder_flops(text_dims, p) if p else 0.0
    return prefix + candidates * text + classifier


def _slot(spec: dict | None, fn: Any, defaults: dict) -> float:
    """A captioner/selector slot: {"flops": x} taken as is, else kwargs of `fn` (defaults filled in)."""
    if not spec:
        return 0.0
    if "flops" in spec:
        return float(spec["flops"])
    kwargs = {**defaults, **spec}
    return float(fn(**kwargs))


# --------------------------------------------------------------------------- one LLaVA item


# the per-item components, in report order; ``total`` is their sum
COMPONENTS = ("vision", "pruner", "projector", "llm_prefill", "llm_decode", "captioner", "selector")


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
    lm_head_positions: int = 1,
    visionzip_contextual: int | None = None,
    text_guide: dict | None = None,
    vision_layers: int | None = None,
    reference: bool = True,
) -> dict[str, float]:
    """Per-component FLOPs of one item; `reference_total` = the same item, method none, no caption.

    prompt_tokens: the prefill's non-image text tokens (BOS, system, question, roles); caption_tokens: the
    tokens the caption splice adds. vision_layers: encoder layers the tower runs (default all).
    visionzip_contextual / text_guide: see pruner_flops. captioner/selector: kwargs of caption_model_flops/selector_flops
    (discarded_tokens and feature_dim default from the item) or {"flops": x}.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    text = dims_from_config(llava_config.text_config)
    total_vis, kept = visual_tokens_total, visual_tokens_kept
    if method == "none":
        kept = total_vis

    out: dict[str, float] = {}
    out["vision"] = vision_tower_flops(llava_config.vision_config, layers=vision_layers)
    out["pruner"] = pruner_flops(
        llava_config,
        method=method,
        visual_tokens_total=total_vis,
        visual_tokens_kept=kept,
        visionzip_contextual=visionzip_contextual,
        text_guide=text_guide,
    )
    out["projector"] = projector_flops(llava_config, total_vis if method in IN_LLM_METHODS else kept)

    n_kept = prompt_tokens + kept + caption_tokens
    if method in IN_LLM_METHODS:  # fastv / dart: layers < K see every visual token (K = fastv_layer)
        k = min(fastv_layer, text.layers)
        n_full = prompt_tokens + total_vis + caption_tokens
        prefill = k * layer_flops(text, n_full, n_full) + (text.layers - k) * layer_flops(
            text, n_kept, n_kept
        )
        prefill += lm_head_flops(text, lm_head_positions)
        decode = 0.0
        for t in range(1, new_tokens):  # layers < K keep the full KV cache
            decode += k * layer_flops(text, 1, n_full + t) + (text.layers - k) * layer_flops(
                text, 1, n_kept + t
            )
            decode += lm_head_flops(text)
    else:
        prefill = prefill_flops(text, n_kept, lm_head_positions=lm_head_positions)
        decode = decode_flops(text, n_kept, new_tokens)
    out["llm_prefill"], out["llm_decode"] = prefill, decode

    out["captioner"] = _slot(
        captioner,
        caption_model_flops,
        {"discarded_tokens": total_vis - kept, "feature_dim": llava_config.vision_config.hidden_size},
    )
    out["selector"] = _slot(selector, selector_flops, {})
    out["total"] = sum(out.values())
    if reference:
        ref = llava_item_flops(
            llava_config,
            method="none",
            visual_tokens_total=total_vis,
            visual_tokens_kept=total_vis,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            lm_head_positions=lm_head_positions,
            vision_layers=vision_layers,
            reference=False,
        )
        out["reference_total"] = ref["total"]
    return out


# --------------------------------------------------------------------------- FastV's own convention


def fastv_convention_flops(d: int, m: int, layers: int, n: int, n_kept: int, k: int) -> float:
    """FastV §4.2: K layers at n tokens + (T-K) layers at n_kept, each 4nd^2 + 2n^2d + 2ndm (MACs)."""

    def per_layer(x: int) -> float:
        return 4.0 * x * d * d + 2.0 * x * x * d + 2.0 * x * d * m

    return k * per_layer(n) + (layers - k) * per_layer(n_kept)


# --------------------------------------------------------------------------- selector and visual token counts

LONGCLIP_MAX_TOKENS = 248
# "Question:" + "Supplemental information for questions:" as ~7 BPE tokens + start/end tokens (an estimate:
# no CLIP tokenizer ships here; one more or less moves the 7B ACCM row by <0.01 points)
SELECTOR_TEMPLATE_TOKENS = 9


def selector_real_tokens(question_tokens: int, caption_tokens: int) -> int:
    """Tokens of one selector candidate at its real length (capped at LongCLIP's 248 positions)."""
    return min(LONGCLIP_MAX_TOKENS, question_tokens + caption_tokens + SELECTOR_TEMPLATE_TOKENS)


def visual_tokens(llava_config: Any) -> int:
    """Patch tokens the vision tower produces per image (576 for LLaVA-1.5's CLIP ViT-L/14-336)."""
    vision = llava_config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


if __name__ == "__main__":  # the CLI lives beside the model: python -m pipeline.flops ...
    from pipeline.flops_cli import main

    sys.exit(main())
