"""Named LLaVA-1.5 configs, the ACCM paper's reference parts, one item's components as the CLI prints them,
the method x budget table, and the ``python -m pipeline.flops`` command line, on ``pipeline.flops``'s model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.config import IN_LLM_METHODS, METHODS, TEXT_GUIDED_METHODS
from pipeline.flops import (
    CAPTION_SPLICE_TOKENS,
    COMPONENTS,
    DEFAULT_CAPTION_TOKENS,
    LONGCLIP_MAX_TOKENS,
    SELECTOR_TEMPLATE_TOKENS,
    TransformerDims,
    dims_from_config,
    fastv_convention_flops,
    llava_item_flops,
    selector_real_tokens,
    vision_layers_run,
    visual_tokens,
)


def named_llava_config(name: str) -> Any:
    """Published LLaVA-1.5 configs (no weights): CLIP ViT-L/14-336 + Vicuna/LLaMA-7B or -13B."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = {
        "llava-1.5-7b": dict(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
        ),
        "llava-1.5-13b": dict(
            hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
        ),
    }[name]
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    llama = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **text)
    return LlavaConfig(
        vision_config=vision, text_config=llama, vision_feature_layer=-2, image_token_index=32000
    )


NAMED_MODELS = ("llava-1.5-7b", "llava-1.5-13b")


def default_text_guide_dims(model: str) -> TransformerDims | None:
    """PruMerge+'s question encoder for ``model``: CLIP ViT-L/14-336's text tower for the named LLaVA-1.5
    models (their vision tower's own CLIP), none for a checkpoint dir (the engine loads one only when given
    ``clip_text_url``)."""
    return CLIP_L14_TEXT if model in NAMED_MODELS else None


def load_llava_config(model: str) -> Any:
    if model in NAMED_MODELS:
        return named_llava_config(model)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model)


# Reference ACCM parts for the named models (dims only).
CLIP_L14_TEXT = TransformerDims(
    hidden=768, intermediate=3072, layers=12, heads=12, kv_heads=12, gated_ffn=False
)
LONGCLIP_L_TEXT = CLIP_L14_TEXT  # same tower, LONGCLIP_MAX_TOKENS positions
GPT2_SMALL = TransformerDims(
    hidden=768, intermediate=3072, layers=12, heads=12, kv_heads=12, gated_ffn=False, vocab=50257
)
CLIPCAP_MAPPER = TransformerDims(
    hidden=768, intermediate=1536, layers=4, heads=8, kv_heads=8, gated_ffn=False
)
SELECTOR_CLASSIFIER = TransformerDims(
    hidden=768, intermediate=1536, layers=4, heads=8, kv_heads=8, gated_ffn=False
)


def reference_accm_slots(
    *,
    question_tokens: int,
    caption_tokens: int = DEFAULT_CAPTION_TOKENS,
    beams: int = 3,
    prefix_len: int = 20,
    selector_tokens: int | None = None,
) -> tuple[dict, dict]:
    """Captioner (ClipCap mapper + GPT-2 small, beam search) and selector (LongCLIP-L x beams + 4-layer
    encoder) slots as in the ACCM paper's code.

    The selector encodes each candidate at its real length (question + caption + template, as
    ``actors.selector`` does: padding to the longest candidate only); the paper's LongCLIP code pads every
    candidate to 248 positions, which ``selector_tokens=248`` reproduces (~2.3x the selector's cost at a
    64-token question and 36-token caption).
    """
    if selector_tokens is None:
        selector_tokens = selector_real_tokens(question_tokens, caption_tokens)
    captioner = dict(
        mapper_dims=CLIPCAP_MAPPER,
        decoder_dims=GPT2_SMALL,
        prefix_len=prefix_len,
        question_tokens=question_tokens,
        beams=beams,
        caption_tokens=caption_tokens,
    )
    selector = dict(
        text_dims=LONGCLIP_L_TEXT,
        classifier_dims=SELECTOR_CLASSIFIER,
        candidates=beams,
        tokens_per_candidate=selector_tokens,
        projection_dim=768,
    )
    return captioner, selector


def resolve_keep(total: int, keep_tokens: int | None, prune_rate: float | None) -> int:
    """Same rule as the engine's resolve_keep_tokens: count wins, else round((1-rate)*total), else all."""
    if keep_tokens is not None:
        return max(0, min(int(keep_tokens), total))
    if prune_rate is not None:
        return max(0, min(total, int(round((1.0 - prune_rate) * total))))
    return total


def llm_caption_tokens(method: str, caption_tokens: int | None) -> int:
    """Text tokens the caption adds to the LLM prefill. ``accm``: the caption budget (default
    DEFAULT_CAPTION_TOKENS) plus the splice's own tokens, under either convention; other methods: an
    explicit ``caption_tokens`` as is (a caption fed by hand), else none."""
    if method == "accm":
        cap = DEFAULT_CAPTION_TOKENS if caption_tokens is None else caption_tokens
        return cap + CAPTION_SPLICE_TOKENS if cap else 0
    return caption_tokens or 0


def cli_item(
    llava_config: Any,
    *,
    method: str,
    keep: int,
    prompt_tokens: int,
    new_tokens: int,
    caption_tokens: int | None = None,
    fastv_layer: int = 2,
    convention: str = "ours",
    question_tokens: int | None = None,
    selector_tokens: int | None = None,
    beams: int | None = None,
    text_guide_dims: TransformerDims | None = CLIP_L14_TEXT,
    captioner_dir: str | None = None,
    selector_dir: str | None = None,
) -> dict[str, float]:
    """Components of one item as the CLI prints them.

    Vision: the layers the job's engine runs for this method (``vision_layers_run``): up to the feature
    layer, every layer for PruMerge+/ACCM with a text guide (projected patches of the last layer).
    ``text_guide_dims``: the CLIP text tower PruMerge+ (and ACCM's base pruner) embeds the question with;
    CLIP ViT-L/14-336's own by default, None for a checkpoint that has none. ``accm``: the reference parts
    (ClipCap mapper + GPT-2, LongCLIP-L selector; ``beams`` default 3), or, with ``captioner_dir`` and
    ``selector_dir``, the shipped folders' own dims (their configs' beams).
    """
    vision = llava_config.vision_config
    total = visual_tokens(llava_config)
    text = llava_config.text_config
    if method == "none":
        keep = total
    llm_caption = llm_caption_tokens(method, caption_tokens)
    if convention == "fastv":
        # Only the LLM prefill, FastV's per-layer formula in MACs; the caption splice as extra text.
        cap = llm_caption
        n = prompt_tokens + total
        n_kept = prompt_tokens + keep + cap
        k = fastv_layer if method in IN_LLM_METHODS else 0
        d, m, L = text.hidden_size, text.intermediate_size, text.num_hidden_layers
        prefill = fastv_convention_flops(d, m, L, n if method in IN_LLM_METHODS else n_kept, n_kept, k)
        ref = fastv_convention_flops(d, m, L, n, n, 0)
        return {
            "convention": "fastv",
            "vision": 0.0,
            "projector": 0.0,
            "llm_prefill": prefill,
            "llm_decode": 0.0,
            "total": prefill,
            "reference_total": ref,
            "reduction": 1.0 - prefill / ref,
        }
    q = question_tokens if question_tokens is not None else min(prompt_tokens, 77)
    text_guide = None
    if method in TEXT_GUIDED_METHODS and text_guide_dims is not None:
        text_guide = {
            "text_dims": text_guide_dims,
            "question_tokens": q,
            "projection_dim": vision.projection_dim,
        }
    captioner = selector = None
    if method == "accm":
        cap = DEFAULT_CAPTION_TOKENS if caption_tokens is None else caption_tokens
        if (captioner_dir is None) != (selector_dir is None):
            raise ValueError("pass both captioner_dir and selector_dir, or neither (the reference parts)")
        if captioner_dir is not None:
            from actors.accm import accm_flops_slots

            captioner, selector = accm_flops_slots(
                captioner_dir,
                selector_dir,
                discarded_tokens=total - keep,
                question_tokens=q,
                caption_tokens=cap,
                selector_tokens=selector_tokens,
                kept_tokens=keep,
            )
        else:
            captioner, selector = reference_accm_slots(
                question_tokens=q,
                caption_tokens=cap,
                beams=3 if beams is None else beams,
                selector_tokens=selector_tokens,
            )
    out = llava_item_flops(
        llava_config,
        method=method,
        visual_tokens_total=total,
        visual_tokens_kept=keep,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        caption_tokens=llm_caption,
        fastv_layer=fastv_layer,
        captioner=captioner,
        selector=selector,
        text_guide=text_guide,
        # the layers the job's engine would run for this method (not every layer, as HF Llava does)
        vision_layers=vision_layers_run(llava_config, projected=text_guide is not None),
    )
    out["reduction"] = 1.0 - out["total"] / out["reference_total"]
    return {"convention": "ours", "visual_tokens_total": total, "visual_tokens_kept": keep, **out}


# FastV's 192/128/64, ACCM's 72 (87.5%), and 36/18, as kept counts of LLaVA-1.5's 576 tokens
TABLE_KEEPS = (192, 128, 72, 64, 36, 18)
TABLE_METHODS = ("none", "fastv", "dart", "visionzip", "prumerge_plus", "cdpruner", "divprune", "accm")


def flops_table(
    llava_config: Any,
    *,
    prompt_tokens: int = 64,
    new_tokens: int = 4,
    caption_tokens: int = DEFAULT_CAPTION_TOKENS,
    question_tokens: int | None = None,
    selector_tokens: int | None = None,
    beams: int | None = None,
    keeps: tuple[int, ...] | None = None,
    methods: tuple[str, ...] = TABLE_METHODS,
    **parts: Any,
) -> list[dict]:
    """Rows (method, kept, FLOPs and components, % of the unpruned item) for the table.

    ``keeps`` default: TABLE_KEEPS, which are LLaVA-1.5's 576-token counts, scaled to the model's own
    visual token count. ``parts``: cli_item's text_guide_dims / captioner_dir / selector_dir."""
    if keeps is None:
        total = visual_tokens(llava_config)
        keeps = tuple(dict.fromkeys(max(1, round(k * total / 576)) for k in TABLE_KEEPS))
    rows = []
    for keep in keeps:
        for method in methods:
            if method == "none" and keep != keeps[0]:
                continue
            item = cli_item(
                llava_config,
                method=method,
                keep=keep,
                prompt_tokens=prompt_tokens,
                new_tokens=new_tokens,
                caption_tokens=caption_tokens if method == "accm" else None,
                question_tokens=question_tokens,
                selector_tokens=selector_tokens,
                beams=beams,
                **parts,
            )
            rows.append(
                {
                    "method": method,
                    "kept": item["visual_tokens_kept"],
                    "flops": item["total"],
                    "percent_of_unpruned": 100.0 * item["total"] / item["reference_total"],
                    **{k: item[k] for k in COMPONENTS},
                }
            )
    return rows


def _accm_overhead_lines(rows: list[dict]) -> str:
    """What ACCM adds to its base pruner at each kept count, in points of the unpruned item: the caption's
    tokens in the LLM (prefill + decode) set a floor that no caption model or selector can go under."""
    by = {(r["method"], r["kept"]): r for r in rows}
    lines = [
        "accm over prumerge_plus, points of the unpruned item: caption in the LLM + caption model + selector"
    ]
    for (method, kept), r in by.items():
        base = by.get(("prumerge_plus", kept))
        if method != "accm" or base is None:
            continue
        ref = 100.0 * r["flops"] / r["percent_of_unpruned"]

        def pts(x: float, ref: float = ref) -> float:
            return 100.0 * x / ref

        llm = pts(r["llm_prefill"] + r["llm_decode"] - base["llm_prefill"] - base["llm_decode"])
        floor = base["percent_of_unpruned"] + llm
        lines.append(
            f"  kept {kept:>4}: +{llm:.2f} + {pts(r['captioner']):.2f} + {pts(r['selector']):.2f}"
            f" -> {r['percent_of_unpruned']:.1f}%  (floor with a free caption model and selector: {floor:.1f}%)"
        )
    return "\n".join(lines)


def _unit(rows: list[dict]) -> tuple[float, str]:
    """(scale, name) that shows the unpruned item as a number >= 1: TFLOPs for LLaVA-7B, MFLOPs for the
    proving ground's models."""
    top = max(100.0 * r["flops"] / r["percent_of_unpruned"] for r in rows)
    for scale, name in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")):
        if top >= scale:
            return scale, name
    return 1.0, "FLOPs"


def _format_table(rows: list[dict], title: str, scale: float = 1e12, unit: str = "TFLOPs") -> str:
    cols = COMPONENTS
    head = f"{'method':<14}{'kept':>5}{unit:>9}{'% unpr.':>9}" + "".join(f"{c:>12}" for c in cols)
    lines = [title, head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<14}{r['kept']:>5}{r['flops'] / scale:>9.3f}{r['percent_of_unpruned']:>8.1f}%"
            + "".join(f"{r[c] / scale:>12.4f}" for c in cols)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.flops",
        description=__doc__.split("\n")[0],
        epilog="Vision tower: the encoder layers the job's engine runs for the method, up to LLaVA's feature "
        "layer (23 of 24 for -2), or all of them for prumerge_plus/accm with a CLIP text guide (the last "
        "layer's projected patches); PruMerge+'s single-head CLS score prices the next layer's k_proj/q_proj.",
    )
    p.add_argument("--model", default="llava-1.5-7b", help="llava-1.5-7b, llava-1.5-13b, or a checkpoint dir")
    p.add_argument("--method", choices=METHODS, default="none")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep-tokens", type=int)
    budget.add_argument("--prune-rate", type=float)
    p.add_argument("--fastv-layer", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, help="non-image text tokens of the prefill")
    p.add_argument("--new-tokens", type=int)
    p.add_argument(
        "--caption-tokens", type=int, help=f"caption budget (accm: default {DEFAULT_CAPTION_TOKENS})"
    )
    p.add_argument(
        "--question-tokens", type=int, help="question tokens for the text towers (default min(P, 77))"
    )
    p.add_argument(
        "--selector-tokens",
        type=int,
        help="tokens per selector candidate (default: real length = question + caption + "
        f"{SELECTOR_TEMPLATE_TOKENS}; {LONGCLIP_MAX_TOKENS} = LongCLIP padded as in the paper's code)",
    )
    p.add_argument("--beams", type=int, help="reference ACCM parts' beams (default 3)")
    p.add_argument("--captioner", help="price this caption-model folder instead of the reference GPT-2 one")
    p.add_argument("--selector", help="price this selector folder instead of the reference LongCLIP-L one")
    p.add_argument(
        "--clip-text",
        help="CLIP folder whose text tower guides PruMerge+ (default: CLIP ViT-L/14-336's for the named "
        "models; none for a checkpoint dir)",
    )
    p.add_argument("--convention", choices=("ours", "fastv"), default="ours")
    p.add_argument("--json", action="store_true", help="print the item's components as JSON")
    p.add_argument("--table", action="store_true", help="print the method x kept-tokens table")
    args = p.parse_args(argv)

    config = load_llava_config(args.model)
    if (args.captioner is None) != (args.selector is None):
        p.error("--captioner and --selector go together")
    if args.clip_text is not None:
        from transformers import AutoConfig

        clip = AutoConfig.from_pretrained(args.clip_text)
        text_guide_dims = dims_from_config(getattr(clip, "text_config", clip))
    else:
        text_guide_dims = default_text_guide_dims(args.model)
    # what both the table and a single item take from the command line as is
    parts = dict(text_guide_dims=text_guide_dims, captioner_dir=args.captioner, selector_dir=args.selector,
                 question_tokens=args.question_tokens, selector_tokens=args.selector_tokens, beams=args.beams)
    if args.table:
        prompt = 64 if args.prompt_tokens is None else args.prompt_tokens  # LLaVA-1.5's VQA prompt, see notes
        new = 4 if args.new_tokens is None else args.new_tokens
        cap = DEFAULT_CAPTION_TOKENS if args.caption_tokens is None else args.caption_tokens
        rows = flops_table(
            config,
            prompt_tokens=prompt,
            new_tokens=new,
            caption_tokens=cap,
            **parts,
        )
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            title = (
                f"{args.model}: per-item FLOPs ({_unit(rows)[1]}, convention 'ours'); "
                f"{visual_tokens(config)} visual tokens, prompt {prompt} tokens, {new} new tokens; "
                f"accm: caption budget {cap} (+{CAPTION_SPLICE_TOKENS} splice) "
                + (
                    f"tokens, caption model {args.captioner}, selector {args.selector}"
                    if args.captioner
                    else f"tokens, {args.beams or 3} beams (GPT-2 + LongCLIP-L)"
                )
                + ", selector "
                + (
                    f"{args.selector_tokens} tokens/candidate"
                    if args.selector_tokens
                    else "candidates at real length"
                )
            )
            print(_format_table(rows, title, *_unit(rows)))
            print(_accm_overhead_lines(rows))
        return 0
    if args.prompt_tokens is None or args.new_tokens is None:
        p.error("--prompt-tokens and --new-tokens are required (or use --table)")
    total = visual_tokens(config)
    keep = resolve_keep(total, args.keep_tokens, args.prune_rate)
    item = cli_item(
        config,
        method=args.method,
        keep=keep,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        caption_tokens=args.caption_tokens,
        fastv_layer=args.fastv_layer,
        convention=args.convention,
        **parts,
    )
    if args.json:
        print(json.dumps(item, indent=1))
    else:
        for key, value in item.items():
            shown = f"{value / 1e12:.4f} TFLOPs" if isinstance(value, float) and value > 1e6 else value
            print(f"{key:>20}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
