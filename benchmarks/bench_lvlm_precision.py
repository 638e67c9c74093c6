"""The chain's LVLM stage-2 training step in float32 vs under CPU bfloat16 autocast (``train_lvlm_v2.py --autocast``).

Both settings run the same steps' batches (the chain's stage-2 flags, ``jobs/reproduce_v2.py``), interleaved step by
step with the order alternating, so a machine that changes speed during the run (these VMs do, by 10-20% over
minutes) slows both alike. Each timed step is the whole of training's forward and backward (tower, LLM, every
supervision loss); the optimizer does not step, so both settings see the same weights. Prints the median seconds
per step of each, their ratio measured in this run, and how far the bf16 losses are from the float32 ones.

    python benchmarks/bench_lvlm_precision.py --lvlm runs/chain/lvlm --start 1500   # a trained LVLM, past the phase
    python benchmarks/bench_lvlm_precision.py                                       # random weights, default preset
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from actors import shapes_lvlm_v2 as V  # noqa: E402
from jobs import reproduce_v2 as R  # noqa: E402
from jobs import train_lvlm_v2 as T  # noqa: E402


def timed_step(model, args, batch, words: T.WordIds) -> tuple[float, float]:
    """(seconds, total loss) of one forward + backward; gradients are dropped, weights untouched."""
    t0 = time.perf_counter()
    total, _, _, _ = T.step_losses(model, args, batch, words)
    total.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds, total.item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lvlm", default=None, help="a trained v2 LVLM folder (default: random weights of --preset)")
    p.add_argument("--preset", default="default", choices=sorted(V.PRESETS))
    p.add_argument("--start", type=int, default=1500, help="first stage-2 step whose batch is timed")
    p.add_argument("--steps", type=int, default=12, help="steps timed per setting")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not T.native_bf16():
        print("bench_lvlm_precision: this CPU has no native bf16; --autocast auto trains in float32 here")
        return {}
    torch.set_num_threads(args.threads)
    tok = V.build_tokenizer()
    if args.lvlm:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.lvlm)
    else:
        model = V.build_model(args.preset, tokenizer=tok)
    model.config.text_config._attn_implementation = "sdpa"
    model.model.vision_tower.requires_grad_(False)
    preset = args.preset if not args.lvlm else "default"
    targs = T.parse_args(["--clip", "-", "--output", "-", "--ckpt", "-", "--preset", preset,
                          *R.LVLM_STAGE2, "--shape-phase", str(R.LVLM_SHAPE_PHASE_STEPS),
                          *(R.TINY_LVLM_LAYERS if preset == "tiny" else ())])
    words = T.WordIds.of(tok)
    modes = {"fp32": argparse.Namespace(**{**vars(targs), "autocast": "none"}),
             "bf16": argparse.Namespace(**{**vars(targs), "autocast": "bf16"})}
    first = T.step_batch(tok, T.phase_args(targs, 2, args.start), 2, args.start, R.LVLM_STAGE2_STEPS)
    for run_args in modes.values():  # warm-up
        timed_step(model, T.phase_args(run_args, 2, args.start), first, words)
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    gaps: list[float] = []
    for i, step in enumerate(range(args.start, args.start + args.steps)):
        batch = first if step == args.start else T.step_batch(tok, T.phase_args(targs, 2, step), 2, step,
                                                               R.LVLM_STAGE2_STEPS)
        losses = {}
        for name in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            s, losses[name] = timed_step(model, T.phase_args(modes[name], 2, step), batch, words)
            seconds[name].append(s)
        gaps.append(abs(losses["bf16"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-9))
    median = {m: statistics.median(v) for m, v in seconds.items()}
    ratio = median["fp32"] / median["bf16"]
    where = args.lvlm or f"random '{args.preset}' weights"
    print(f"v2 LVLM stage-2 step ({where}), the chain's flags, steps {args.start}-{args.start + args.steps - 1}, "
          f"{args.threads} threads, interleaved; median of {args.steps}:")
    for m, v in median.items():
        print(f"  {m:5s} {v:.3f} s/step")
    print(f"  speedup of bf16 autocast: {ratio:.2f}x; its total loss within {100 * max(gaps):.2f}% of float32's "
          f"(median {100 * statistics.median(gaps):.2f}%)")
    return {"seconds": median, "speedup": ratio, "max_loss_gap": max(gaps)}


if __name__ == "__main__":
    main()
