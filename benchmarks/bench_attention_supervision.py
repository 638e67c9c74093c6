"""Training step of the v2 LVLM with attention supervision: eager attention maps vs SDPA + captured rows.

Both paths compute the same loss (tests/test_lvlm_v2_levers.py checks the rows equal eager's maps); this
prints the wall time of one full training step (tower, forward, supervision losses, backward) for each,
interleaved, best of --repeats, and their ratio measured in this run.

    python benchmarks/bench_attention_supervision.py              # the default v2 preset, random weights, batch 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from actors import shapes_lvlm as L  # noqa: E402
from actors import shapes_lvlm_v2 as V  # noqa: E402
from actors.attention_rows import AttentionCapture  # noqa: E402
from jobs import train_lvlm_v2 as T  # noqa: E402


def step(model, px, pb, layers: tuple[int, int, int], heads: int, captured: bool) -> float:
    word_layer, context_layer, hop_layer = layers
    t0 = time.perf_counter()
    with torch.no_grad():
        hidden, _ = L.vision_features(model, px)
    if captured:
        model.config.text_config._attn_implementation = "sdpa"
        with AttentionCapture(model.model.language_model, set(layers)) as cap:
            logits, labels = L.packed_logits(model, px, pb, features=hidden[:, 1:])
        aux = sum(L.target_nll(cap.rows(layer, t, heads), t) for layer, t in
                  ((word_layer, pb.word_targets), (context_layer, pb.context_targets), (hop_layer, pb.hop_targets)))
    else:
        model.config.text_config._attn_implementation = "eager"
        logits, labels, maps = L.packed_logits(model, px, pb, features=hidden[:, 1:], output_attentions=True)
        aux = sum(L.attention_target_loss(maps[layer], t, heads) for layer, t in
                  ((word_layer, pb.word_targets), (context_layer, pb.context_targets), (hop_layer, pb.hop_targets)))
    (F.cross_entropy(logits, labels) + aux).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(V.PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = V.build_tokenizer()
    model = V.build_model(args.preset, tokenizer=tok)
    layers = (2, 3, 4) if V.PRESETS[args.preset]["layers"] > 4 else (0, 1, 2)
    heads = max(1, V.PRESETS[args.preset]["heads"] // 2)
    targs = T.parse_args(["--clip", "-", "--output", "-", "--ckpt", "-", "--batch", str(args.batch)])
    px, pb, _, _ = T.vqa_batch(tok, np.random.default_rng(0), targs, (20, 28), 1)  # no drops: every token kept
    times: dict[str, list[float]] = {"eager maps": [], "sdpa + captured rows": []}
    step(model, px, pb, layers, heads, captured=True)  # warm-up
    for _ in range(args.repeats):
        times["eager maps"].append(step(model, px, pb, layers, heads, captured=False))
        times["sdpa + captured rows"].append(step(model, px, pb, layers, heads, captured=True))
    best = {k: min(v) for k, v in times.items()}
    print(f"v2 LVLM '{args.preset}', batch {args.batch} images, sequence {pb.input_ids.shape[1]} tokens, "
          f"{args.threads} threads; best of {args.repeats}:")
    for k, v in best.items():
        print(f"  {k:22s} {v:.2f} s/step")
    ratio = best["eager maps"] / best["sdpa + captured rows"]
    print(f"  speedup of the captured rows: {ratio:.2f}x")
    return {"seconds": best, "speedup": ratio}


if __name__ == "__main__":
    main()
