"""LLM-stage cost per method: wall time and analytic FLOPs of projector + LLM, none vs every pruner.

Vision + pruning run once per method outside the timed region (in the pipeline they belong to the
captioner tier); the timed region is ``LlavaEngine.generate`` on a batch with a fixed number of new
tokens (``ignore_eos``), so every method does the same decode steps. Prints, per method, the median
wall time (best of --repeats, methods interleaved), the LLM-stage FLOPs, and how much of the FLOPs reduction turned into a speedup.

    python benchmarks/bench_llm_stage.py                       # models/shapes/lvlm, else a tiny random model
    python benchmarks/bench_llm_stage.py --model llava7b-2l --batch 2   # 7B widths, 2 LLM layers, random
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from actors.engine import METHODS, LlavaEngine, resolve_keep_tokens  # noqa: E402
from actors.tiny import (  # noqa: E402
    LLAVA_7B_SHAPE,
    build_processor,
    build_tiny_llava,
    build_tokenizer,
    fast_random_llava,
    llava_config,
)
from pipeline.shapes import make_item, render  # noqa: E402

DEFAULT_MODEL = "models/shapes/lvlm"
LLM_KEYS = ("projector", "llm_prefill", "llm_decode")


def load_engine(name: str, dtype: torch.dtype = torch.bfloat16) -> LlavaEngine:
    if name == "tiny":  # the size of the project's CPU-trained models (NOTES: 128-d tower x5, LLaMA 128-d x4)
        model, processor = build_tiny_llava(
            vision_hidden=128,
            vision_layers=5,
            text_hidden=128,
            text_layers=4,
            heads=4,
            kv_heads=4,
            init_std=0.1,
        )
        model.config._attn_implementation = "eager"
        return LlavaEngine(model, processor, model_id="tiny-random")
    if name == "llava7b-2l":  # LLaVA-1.5-7B widths, 2 vision + 2 LLM layers, random weights
        tok = build_tokenizer()
        config = llava_config(**{**LLAVA_7B_SHAPE, "vision_layers": 2, "text_layers": 2},
                              image_token_index=tok.convert_tokens_to_ids("<image>"))
        model = fast_random_llava(config, dtype=dtype)
        return LlavaEngine(model, build_processor(tok, image_size=336, patch=14), model_id=name)
    return LlavaEngine.from_pretrained(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = DEFAULT_MODEL if Path(DEFAULT_MODEL, "config.json").exists() else "tiny"
    parser.add_argument("--model", default=default, help="model dir/URL, 'tiny' or 'llava7b-2l'")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prune-rate", type=float, default=0.875)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--fastv-layer", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16",
                        help="llava7b-2l's weights: bf16 (default, LLaVA-1.5's dtype; half the memory traffic of the "
                        "weight-bound decode steps) or fp32 (what the job runs on CPU by default)")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                        help="the engine's attention: fused (default) or the eager reference")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = load_engine(args.model, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    if args.attention != engine.attention:
        engine = LlavaEngine(engine.model, engine.processor, model_id=engine.model_id, attention=args.attention)
    n_layers = engine.config.text_config.num_hidden_layers
    fastv_layer = min(args.fastv_layer, n_layers - 1)
    items = [make_item(7, "test", i) for i in range(args.batch)]
    ids, questions = [it.id for it in items], [it.question for it in items]
    vision = engine.encode_images(engine.preprocess([render(it.objects) for it in items]))
    keep = resolve_keep_tokens(engine.num_patches, prune_rate=args.prune_rate)
    print(
        f"model={engine.model_id} batch={args.batch} visual tokens {engine.num_patches} -> {keep} "
        f"(prune rate {args.prune_rate}), new tokens {args.new_tokens}, FastV/DART layer {fastv_layer}/{n_layers}, "
        f"threads {torch.get_num_threads()}, dtype {engine.dtype}, attention {engine.attention}"
    )

    runs, results = {}, {}
    for method in METHODS:
        pruned = engine.prune(vision, method, keep, ids, questions)
        captions = (
            [f"the {it.objects[0].shape} is {it.objects[0].color}." for it in items]
            if method == "accm"
            else None
        )

        def run(method=method, pruned=pruned, captions=captions):
            return engine.generate(
                pruned.retained, questions, captions, method=method, keep_tokens=keep,
                fastv_layer=fastv_layer, dart_layer=fastv_layer, max_new_tokens=args.new_tokens, ignore_eos=True,
            )  # fmt: skip

        runs[method] = run
        results[method] = run()  # warm-up; also the FLOPs
    # round-robin repeats, best of N: other load on a shared machine hits every method alike
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            t0 = time.perf_counter()
            runs[method]()
            times[method].append(time.perf_counter() - t0)
    rows = []
    for method in METHODS:
        result = results[method]
        flops = sum(sum(f[k] for k in LLM_KEYS) for f in result.flops)
        rows.append((method, min(times[method]), flops, sum(result.prefill_tokens) / args.batch))

    t_none, f_none = rows[0][1], rows[0][2]
    print(f"{'method':<14}{'prefill len':>12}{'wall ms':>10}{'items/s':>10}{'LLM GFLOPs':>12}"
          f"{'FLOPs ratio':>13}{'speedup':>10}{'speedup/ratio':>15}")  # fmt: skip
    for method, t, f, n in rows:
        ratio, speedup = f_none / f, t_none / t
        print(f"{method:<14}{n:>12.1f}{t * 1e3:>10.1f}{args.batch / t:>10.1f}{f / 1e9:>12.3f}"
              f"{ratio:>13.2f}{speedup:>10.2f}{speedup / ratio:>15.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
