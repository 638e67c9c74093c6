"""One-GPU benchmark at LLaVA-1.5-7B shape: our engine against Hugging Face ``generate``, pruning speedups
against their analytic FLOPs ratios, peak memory, and the Triton kernels' bandwidth.

    python benchmarks/bench_gpu.py --out docs/reports/bench_gpu_h200.json --md docs/reports/bench_gpu_h200.md
    python benchmarks/bench_gpu.py --quick --allow-cpu      # CPU smoke run of the whole path (tiny widths)

Model: LLaVA-1.5-7B shapes with random bf16 weights built straight on the GPU (CLIP-L/336: 24 layers,
1024 wide, patch 14, 576 patches; LLaMA: 32 layers, 4096 wide, MLP 11008, 32 heads, vocab 32064), the
filling of ``actors.tiny.fast_random_llava``. Images and questions: Shapes-VQA (``pipeline.shapes``).

Measured, per batch (16, 64), best of ``--repeats`` after a warm-up, ``torch.cuda.synchronize`` around
every timer, peak memory (``max_memory_allocated``, weights included) reset per setting:

* ours, ``none`` (576 visual tokens): ``LlavaEngine.generate`` with 8 new tokens (``ignore_eos``), vision
  and pruning outside the timed region; and end to end (``encode_images`` + ``prune`` + ``generate``).
* Hugging Face: the same model's ``LlavaForConditionalGeneration.generate`` with SDPA attention, greedy,
  8 new tokens (``min_new_tokens=8``), on the same prompts (processor-built ``input_ids``, ``<image>``
  expanded to 576 tokens, left padded) and pixel values. HF runs the vision tower inside ``generate``, so
  the like-for-like ratio is ours end to end / HF (``ours/HF``); ours ``generate`` only / HF is shown too.
* 192 / 72 / 36 kept tokens: a pre-LLM pruner (PruMerge+ without its CLIP text guide; VisionZip if that
  fails) and FastV (in-LLM, layer 2): items/s, speedup over ``none``, the analytic LLM FLOPs ratio
  (projector + prefill + decode of ``GenerationResult.flops``, none / method), and speedup / FLOPs ratio;
  at 72 also every other pruner (``--more-methods``: DART, VisionZip, CDPruner, DivPrune, random), budget
  allowing. ACCM's LLM stage is PruMerge+'s plus a caption of a few tokens (bench_llm_stage.py has it).
* kernels: ``benchmarks/bench_kernels.py``'s rows, achieved GB/s against the HBM peak (H200: 4.8 TB/s).

Targets (checked and printed; results not reaching them are reported, the exit status is still 0):
ours >= 1.0x HF generate items/s at 576 tokens, and speedup >= 0.8 x the FLOPs ratio at 72 kept tokens.

Fits in 8 minutes on one H200: settings run in priority order (576 + HF + 72 for both batches first) and
stop being added once ``--budget-s`` (default 420 s, counted from the start, model build included) is
spent; the skipped ones are listed. Without a CUDA GPU it prints "no CUDA GPU: nothing measured" and
exits 0, unless ``--quick --allow-cpu``: 2 LLM + 2 vision layers at small widths (576 patches kept), batch
2, fp32 on CPU, every measurement path in well under a minute (the test's smoke run).
Exit status 1 only when a setting raised (its error is in the table and the JSON).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_report import NEW_TOKENS, TARGET_KEEP, markdown, table_lines, targets  # noqa: E402

SKIP_LINE = "bench_gpu: no CUDA GPU: nothing measured (run it on a GPU machine; --quick --allow-cpu for a CPU smoke run)"
LLM_KEYS = ("projector", "llm_prefill", "llm_decode")
FASTV_LAYER = 2  # FastV's K
DEFAULT_BUDGET_S = 420.0
HBM_PEAK_GBPS = {"H200": 4800.0}  # checked before bench_kernels' own table / the driver's clock x bus width

# LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B widths; --quick: the same 576 patches, tiny widths, 2+2 layers
QUICK_SHAPE = dict(
    image_size=336, patch=14, vision_hidden=64, vision_intermediate=256, vision_layers=2, vision_heads=4,
    text_hidden=128, text_intermediate=344, text_layers=2, heads=4, kv_heads=4, vocab_size=32064,
)  # fmt: skip


# -- model -----------------------------------------------------------------------------------------------


def build_engine(shape: dict, dtype: Any, device: Any) -> Any:
    """A LlavaEngine over random LLaVA weights of ``shape`` on ``device`` (generation config from the tokenizer)."""
    import torch

    from actors.engine import LlavaEngine
    from actors.tiny import build_processor, build_tokenizer, fast_random_llava, llava_config

    tok = build_tokenizer()
    config = llava_config(**shape, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = fast_random_llava(config, dtype=dtype, device=torch.device(device))  # filled on the GPU itself
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    processor = build_processor(tok, image_size=shape["image_size"], patch=shape["patch"])
    return LlavaEngine(model, processor, model_id="llava-1.5-7b-shape-random")


def set_attention(model: Any, impl: str) -> str:
    """Switch the HF modules' attention implementation (HF ``generate`` reads it; our engine's own layer loops
    do not, they pick theirs with ``LlavaEngine(attention=...)`` where that exists)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
    return str(model.config._attn_implementation)


# -- timing ----------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: Any, repeats: int):
        import torch

        self.torch = torch
        self.cuda = torch.device(device).type == "cuda"
        self.repeats = repeats

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def best(self, fn: Callable[[], Any]) -> tuple[Any, list[float]]:
        """Warm-up (its result returned), then ``repeats`` timed calls: (result, seconds per call)."""
        self.sync()
        result = fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return result, times


def llm_flops(result: Any) -> float:
    return float(sum(sum(f[k] for k in LLM_KEYS) for f in result.flops))


# -- one batch's inputs ----------------------------------------------------------------------------------


class BatchInputs:
    """Items, processor outputs (HF's input_ids with 576 image tokens, pixel values) and the vision pass."""

    def __init__(self, engine: Any, batch: int, device: Any):
        import torch

        from actors.prompt import PromptFormat
        from pipeline.shapes import make_item, render

        items = [make_item(7, "test", i) for i in range(batch)]
        self.ids = [it.id for it in items]
        self.questions = [it.question for it in items]
        prompts = [PromptFormat().build(q) for q in self.questions]
        enc = engine.processor(
            text=prompts, images=[render(it.objects) for it in items], padding=True, return_tensors="pt"
        )
        self.input_ids = enc["input_ids"].to(device)
        self.attention_mask = enc["attention_mask"].to(device)
        self.pixels = enc["pixel_values"].to(device, engine.dtype)
        # the engine builds its prompts from the same module: check HF sees exactly the same tokens
        img = engine.image_token_id
        same = True
        for i, q in enumerate(self.questions):
            ids = PromptFormat().token_ids(engine.tokenizer, q, None, img)
            j = ids.index(img)
            want = ids[:j] + [img] * engine.num_patches + ids[j + 1 :]
            same &= enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist() == want
        self.same_prompt = bool(same)
        with torch.no_grad():
            self.vision = engine.encode_images(self.pixels)


# -- settings --------------------------------------------------------------------------------------------


def run_ours(
    engine: Any,
    inp: BatchInputs,
    timer: Timer,
    method: str,
    keep: int,
    fastv_layer: int,
    none_row: dict | None,
    end_to_end: bool = False,
) -> dict:
    """One (method, kept) setting of our engine; ``none_row``: the batch's ``none`` row (speedups, ratios)."""
    batch = len(inp.ids)
    timer.reset_peak()
    t0 = time.perf_counter()
    pruned = engine.prune(inp.vision, method, keep, inp.ids, inp.questions)
    prune_s = time.perf_counter() - t0
    kwargs = dict(method=method, keep_tokens=keep, fastv_layer=fastv_layer, dart_layer=fastv_layer,
                  max_new_tokens=NEW_TOKENS, ignore_eos=True)  # fmt: skip

    def run():
        return engine.generate(pruned.retained, inp.questions, None, **kwargs)

    result, times = timer.best(run)
    peak = timer.peak_gib()
    row = {
        "engine": "ours", "batch": batch, "method": method, "kept": keep,
        "wall_s": min(times), "wall_s_all": times, "items_per_s": batch / min(times),
        "prefill_len_mean": sum(result.prefill_tokens) / batch,
        "new_tokens": sorted(set(result.new_tokens)),
        "llm_gflops": llm_flops(result) / 1e9, "prune_s_untimed": prune_s,
        "notes": list(getattr(pruned, "notes", []) or []),
    }  # fmt: skip
    if none_row is not None:
        row["flops_ratio"] = none_row["llm_gflops"] / row["llm_gflops"]
        row["speedup"] = none_row["wall_s"] / row["wall_s"]
        row["efficiency"] = row["speedup"] / row["flops_ratio"]
    if end_to_end:  # vision + prune + generate: what HF's generate covers

        def e2e():
            vision = engine.encode_images(inp.pixels)
            p = engine.prune(vision, method, keep, inp.ids, inp.questions)
            return engine.generate(p.retained, inp.questions, None, **kwargs)

        timer.reset_peak()
        _, e2e_times = timer.best(e2e)
        row["e2e_wall_s"] = min(e2e_times)
        row["e2e_items_per_s"] = batch / min(e2e_times)
        row["e2e_peak_mem_gib"] = timer.peak_gib()
    row["tokens"] = result.token_ids
    row["peak_mem_gib"] = peak
    return row


def run_hf(engine: Any, inp: BatchInputs, timer: Timer, ours_none: dict | None) -> dict:
    """HF ``generate`` with SDPA on the same inputs, 576 visual tokens, greedy, exactly 8 new tokens."""
    import torch

    model = engine.model
    batch = len(inp.ids)
    previous = str(model.config._attn_implementation)
    try:
        attn = set_attention(model, "sdpa")
        timer.reset_peak()

        def run():
            with torch.inference_mode():
                return model.generate(
                    input_ids=inp.input_ids, attention_mask=inp.attention_mask, pixel_values=inp.pixels,
                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                    pad_token_id=engine.pad_token_id,
                )  # fmt: skip

        out, times = timer.best(run)
    finally:
        set_attention(model, previous)
    new = out[:, inp.input_ids.shape[1] :]
    row = {
        "engine": "hf", "batch": batch, "method": "hf_generate_sdpa", "kept": engine.num_patches,
        "attn_implementation": attn, "wall_s": min(times), "wall_s_all": times, "items_per_s": batch / min(times),
        "new_tokens": [int(new.shape[1])], "same_prompt_as_engine": inp.same_prompt,
        "peak_mem_gib": timer.peak_gib(),
    }  # fmt: skip
    if ours_none is not None:
        row["ours_e2e_over_hf"] = ours_none["e2e_items_per_s"] / row["items_per_s"]
        row["ours_generate_over_hf"] = ours_none["items_per_s"] / row["items_per_s"]
        ours_tokens = ours_none.get("tokens") or []
        row["greedy_tokens_equal"] = (
            sum(a == b for a, b in zip(ours_tokens, new.tolist(), strict=False)) / batch
        )
    return row


def kernel_rows(device: Any) -> dict:
    """benchmarks/bench_kernels.py's ``run`` (LLaVA-7B sizes on CUDA; its --smoke sizes under the interpreter
    on CPU), with GB/s and % of the HBM peak."""
    import torch

    try:
        import triton  # noqa: F401
    except ImportError:
        return {"skipped": "triton is not installed"}
    bk = sys.modules.get("bench_kernels")
    if bk is None:
        spec = importlib.util.spec_from_file_location(
            "bench_kernels", Path(__file__).with_name("bench_kernels.py")
        )
        bk = importlib.util.module_from_spec(spec)
        sys.modules["bench_kernels"] = bk  # its dataclass looks its module up
        spec.loader.exec_module(bk)
    cuda = torch.device(device).type == "cuda"
    previous = os.environ.get("TRITON_INTERPRET")
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        rows = bk.run("cuda" if cuda else "cpu", not cuda)
    finally:
        if not cuda:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
    peak = None
    if cuda:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in HBM_PEAK_GBPS.items() if k in name), None) or bk.peak_bandwidth_gbps(torch)
    out = []
    for r in rows:
        k_gbps, t_gbps = r.nbytes / r.kernel_ms / 1e6, r.nbytes / r.torch_ms / 1e6
        out.append({
            "kernel": r.name, "mb": r.nbytes / 1e6, "kernel_ms": r.kernel_ms, "kernel_gbps": k_gbps,
            "pct_peak": 100 * k_gbps / peak if peak else None, "torch_op": r.torch_name, "torch_ms": r.torch_ms,
            "torch_gbps": t_gbps, "torch_over_kernel": r.torch_ms / r.kernel_ms,
        })  # fmt: skip
    note = None if cuda else "CPU smoke run under the Triton interpreter: timings are meaningless"
    return {"peak_gbps": peak, "rows": out, "note": note}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--md", type=Path, help="write a markdown report here")
    parser.add_argument("--quick", action="store_true", help="2+2 layers, tiny widths, batch 2 (smoke test)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="with --quick: run on CPU (fp32) without CUDA"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="stop adding settings after this many seconds from the start (default %(default)s)",
    )
    parser.add_argument("--batches", type=_ints, default=None, help="comma list (default 16,64; --quick: 2)")
    parser.add_argument(
        "--keeps", type=_ints, default=[192, 72, 36], help="kept visual tokens (default 192,72,36)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per setting after a warm-up (best kept)"
    )
    parser.add_argument(
        "--pre-method", default="prumerge_plus", help="pre-LLM pruner (visionzip if it fails)"
    )
    parser.add_argument(
        "--more-methods", default="dart,visionzip,cdpruner,divprune,random",
        help="further methods measured at 72 kept tokens after the priority settings, budget allowing "
        "(comma list; '' for none; default: the other pruners)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel bandwidth part")
    args = parser.parse_args(argv)
    if args.allow_cpu and not args.quick:
        parser.error("--allow-cpu runs only with --quick (the 7B shape on CPU takes hours)")

    import torch

    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    elif args.allow_cpu:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        print(SKIP_LINE)
        return 0

    import transformers

    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()  # HF generate's per-call notices
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return measure(args, device, dtype, t_start, argv)
    finally:
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)


def measure(args: argparse.Namespace, device: Any, dtype: Any, t_start: float, argv: list[str] | None) -> int:
    import torch
    import transformers

    from actors.engine import METHODS
    from actors.tiny import LLAVA_7B_SHAPE

    shape = QUICK_SHAPE if args.quick else LLAVA_7B_SHAPE
    batches = args.batches or ([2] if args.quick else [16, 64])
    fastv_layer = min(FASTV_LAYER, shape["text_layers"] - 1)
    pre_method = args.pre_method
    more = [m for m in args.more_methods.split(",") if m]
    if pre_method not in METHODS or any(m not in METHODS or m in ("none", "accm") for m in more):
        raise SystemExit(f"--pre-method / --more-methods must be among {METHODS} (not none/accm in --more-methods)")
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"bench_gpu: {device_name}, {dtype}, {'--quick ' if args.quick else ''}{shape['text_layers']} LLM + "
          f"{shape['vision_layers']} vision layers, batches {batches}, keeps {args.keeps}, budget {args.budget_s:.0f} s")  # fmt: skip

    t0 = time.perf_counter()
    engine = build_engine(shape, dtype, device)
    build_s = time.perf_counter() - t0
    n = engine.num_patches
    n_params = sum(p.numel() for p in engine.model.parameters())
    print(
        f"model built on {engine.device} in {build_s:.1f} s: {n_params / 1e9:.2f} B params, {n} visual tokens"
    )
    engine_attention = str(
        getattr(engine, "attention", "eager")
    )  # LlavaEngine(attention=...) where it exists
    print(f"our engine's attention: {engine_attention}; HF baseline: sdpa")
    timer = Timer(device, args.repeats)

    # priority order: what the targets need first (576 + HF + 72 per batch), then 192 and 36
    first = [k for k in args.keeps if k == TARGET_KEEP]
    rest = [k for k in args.keeps if k != TARGET_KEEP]
    plan: list[tuple[int, str, int]] = []
    for b in batches:
        plan += [(b, "none", n), (b, "hf", n)] + [(b, m, k) for k in first for m in (pre_method, "fastv")]
    for b in batches:  # every other pruner at the target budget: speedup / FLOPs ratio per method
        plan += [(b, m, k) for k in first for m in more if m not in (pre_method, "fastv")]
    for b in batches:
        plan += [(b, m, k) for k in rest for m in (pre_method, "fastv")]

    inputs: dict[int, BatchInputs] = {}
    none_rows: dict[int, dict] = {}
    settings: list[dict] = []
    skipped: list[str] = []
    errors = 0
    for b, method, keep in plan:
        if method == args.pre_method:
            method = pre_method  # visionzip once prumerge_plus failed
        label = f"batch {b} {method}@{keep}"
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(label)
            continue
        try:
            if b not in inputs:
                inputs[b] = BatchInputs(engine, b, device)
            inp = inputs[b]
            if method == "hf":
                row = run_hf(engine, inp, timer, none_rows.get(b))
            else:
                try:
                    row = run_ours(engine, inp, timer, method, keep, fastv_layer, none_rows.get(b),
                                   end_to_end=method == "none")  # fmt: skip
                except Exception as exc:
                    if method != "prumerge_plus":
                        raise
                    print(f"  prumerge_plus failed ({exc!r}); VisionZip instead")
                    pre_method = method = "visionzip"
                    row = run_ours(engine, inp, timer, method, keep, fastv_layer, none_rows.get(b))
                    row["notes"].append(f"prumerge_plus failed: {exc!r}")
                if method == "none":
                    none_rows[b] = row
        except Exception as exc:  # one failed setting (e.g. out of memory) does not lose the others
            errors += 1
            row = {"engine": "hf" if method == "hf" else "ours", "batch": b, "method": method, "kept": keep,
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}  # fmt: skip
        settings.append(row)
        done = row.get("items_per_s")
        print(f"  {label}: " + (f"{done:.2f} items/s" if done else row.get("error", "")) +
              f"  [{time.perf_counter() - t_start:.0f} s]")  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()

    kernels: dict = {}
    if args.no_kernels:
        kernels = {"skipped": "--no-kernels"}
    elif time.perf_counter() - t_start > args.budget_s:
        skipped.append("kernels")
        kernels = {"skipped": "budget spent"}
    else:
        try:
            kernels = kernel_rows(device)
        except Exception as exc:
            errors += 1
            kernels = {"error": f"{type(exc).__name__}: {exc}"}

    for r in settings:
        r.pop("tokens", None)
    order = {m: i for i, m in enumerate(("none", "hf_generate_sdpa", pre_method, "fastv", *more))}
    settings.sort(key=lambda r: (r["batch"], -r["kept"], order.get(r["method"], 9)))
    report = {
        "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": {"device_name": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
                "cuda": torch.version.cuda},  # fmt: skip
        "quick": args.quick, "dtype": str(dtype).replace("torch.", ""), "shape": shape, "params": n_params,
        "engine_attention": engine_attention, "visual_tokens": n, "new_tokens": NEW_TOKENS, "fastv_layer": fastv_layer, "pre_method": pre_method,
        "more_methods": more,
        "repeats": args.repeats, "batches": batches, "keeps": args.keeps, "build_s": build_s,
        "budget_s": args.budget_s, "settings": settings, "kernels": kernels, "skipped": skipped,
    }  # fmt: skip
    report["targets"] = targets(settings, args.quick)
    report["elapsed_s"] = time.perf_counter() - t_start
    print("\n".join(table_lines(report)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(report))
        print(f"wrote {args.md}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
