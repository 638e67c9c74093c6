"""Wall time of the sweep with one shared vision encoding per item vs the settings run one after another.

    .venv/bin/python benchmarks/bench_sweep_shared_vision.py [--items 96] [--methods ...] [--prune-rates ...]

Both are the sweep job itself (``jobs/sweep_pruning_rates.py``: graph, per-setting outputs, summaries, the
report), on the same input, with the same tiny random models (LLaVA + ACCM caption model + selector, as
the tests build them), in one Ray session, measured in one run of this script: first the shared-encoding
graph (default), then ``--sequential`` (the main job's graph once per setting). Prints both wall times and
their ratio. Shared goes first, so any first-run warm-up counts against it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _sweep_job():
    spec = importlib.util.spec_from_file_location("sweep_pruning_rates", REPO / "jobs/sweep_pruning_rates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_inputs(root: Path, items: int, shards: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import shapes
    from pipeline.schema import INPUT_SCHEMA

    root.mkdir(parents=True)
    rows = [shapes.item_row(shapes.make_item(11, "test", i)) for i in range(items)]
    per = -(-items // shards)
    for k in range(shards):
        part = rows[k * per : (k + 1) * per]
        if part:
            pq.write_table(pa.Table.from_pylist(part, schema=INPUT_SCHEMA), root / f"part-{k:05d}.parquet")


def build_models(root: Path) -> dict[str, str]:
    from actors.captioner import build_caption_model
    from actors.selector import build_selector
    from actors.tiny import build_tiny_llava, build_tokenizer

    build_tiny_llava(root / "lvlm", text_layers=3)
    build_caption_model(build_tokenizer(), feature_dim=64, hidden=32, decoder_layers=1, mapper_layers=1,
                        max_caption_tokens=4).save_pretrained(root / "captioner")
    build_selector(text_hidden=32, text_layers=1, projection_dim=32, layers=1).save_pretrained(root / "selector")
    return {name: str(root / name) for name in ("lvlm", "captioner", "selector")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=96)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--methods", default="none,fastv,visionzip,prumerge_plus,accm")
    parser.add_argument("--prune-rates", default="0.5,0.875")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    models = build_models(tmp / "models")
    build_inputs(tmp / "in", args.items, args.shards)
    sweep = _sweep_job()
    n_settings = len(sweep.settings_for(args.methods.split(","), [float(r) for r in args.prune_rates.split(",")]))
    common = ["--input", str(tmp / "in"), "--methods", args.methods, "--prune-rates", args.prune_rates,
              "--lvlm", models["lvlm"], "--captioner", models["captioner"], "--selector", models["selector"],
              "--batch-size", str(args.batch_size), "--model-cache", str(tmp / "cache")]  # fmt: skip

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        assert sweep.main([*common, "--output", str(tmp / "shared")]) == 0
        shared = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert sweep.main([*common, "--output", str(tmp / "sequential"), "--sequential"]) == 0
        sequential = time.perf_counter() - t0
    finally:
        ray.shutdown()
    print()
    print(f"{n_settings} settings x {args.items} items ({args.methods} @ {args.prune_rates}), batch "
          f"{args.batch_size}, {args.num_cpus} CPUs, tiny models; outputs in {tmp}")
    print(f"shared vision encoding (one graph) : {shared:8.1f} s")
    print(f"sequential (main job per setting)  : {sequential:8.1f} s")
    print(f"ratio sequential / shared          : {sequential / shared:8.2f}x")


if __name__ == "__main__":
    main()
