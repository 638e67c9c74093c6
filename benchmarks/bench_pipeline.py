"""Throughput of the Ray job vs the same stages in a plain single-process loop (same input, batch size).

    .venv/bin/python benchmarks/bench_pipeline.py [--input DIR] [--lvlm DIR | --tiny] [--method M] [--limit N]
    .venv/bin/python benchmarks/bench_pipeline.py --method accm --repeat 8     # 1600 demo items (the issue's run)

The loop calls exactly the stage callables the Ray graph maps (decode -> captioner tier -> LVLM tier ->
scoring), batch by batch, in this process, with torch on ``--num-cpus`` threads (Ray's CPUs). Ray's end-to-end number is the whole
``run_job`` wall time (read, actor start-up and model loads, the graph, the per-shard writes). Both are
also reported without start-up: the loop without its model loads, and Ray's steady state, measured as
the marginal rate between two jobs in the same Ray session, one on the input and one on it twice
(``N / (T_2N - T_N)``: both jobs pay the same start-up, which is then ``T_N - N / rate``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain_loop(cfg, files: list[str], threads: int) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipeline.lvlm_tier import LVLMTier
    from pipeline.stages import PATH_COLUMN, CaptionerTier, decode_batch, score_batch

    torch.set_num_threads(threads)  # the CPUs Ray gets
    t0 = time.perf_counter()
    captioner, lvlm = CaptionerTier(cfg), LVLMTier(cfg)
    t_loaded = time.perf_counter()
    n = 0
    budget = cfg.limit
    for path in files:
        table = pq.read_table(path)
        if budget is not None:
            table, budget = table.slice(0, budget), max(0, budget - table.num_rows)
        table = table.append_column(PATH_COLUMN, pa.array([path] * table.num_rows, pa.string()))
        for batch in table.to_batches(max_chunksize=cfg.batch_size):
            out = decode_batch(pa.Table.from_batches([batch]), max_pixels=cfg.max_pixels)
            out = score_batch(lvlm(captioner(out)))
            n += out.num_rows
    t1 = time.perf_counter()
    return {"items": n, "wall_s": t1 - t0, "items_per_s": n / (t1 - t0), "items_per_s_no_load": n / (t1 - t_loaded),
            "load_s": t_loaded - t0, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(REPO / "data/shapes_vqa/test"))
    parser.add_argument("--lvlm", default=str(REPO / "models/shapes/lvlm"))
    parser.add_argument("--tiny", action="store_true", help="use a random tiny LLaVA (no shipped model needed)")
    parser.add_argument("--method", default="prumerge_plus")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="copies of the input shards (more items: start-up "
                        "costs weigh less)")
    args = parser.parse_args()

    import ray

    from pipeline import storage
    from pipeline.config import JobConfig
    from pipeline.graph import run_job

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    lvlm = args.lvlm
    if args.tiny or not os.path.isdir(lvlm):
        from actors.tiny import build_tiny_llava

        print(f"(using a random tiny LLaVA: {'--tiny' if args.tiny else lvlm + ' not found'})")
        lvlm = str(tmp / "lvlm")
        build_tiny_llava(lvlm)
    src = tmp / "in"
    src.mkdir()
    for r in range(args.repeat):  # ids need only be unique per shard
        for f in storage.list_parquet_files(args.input):
            shutil.copyfile(f, src / f"r{r}-{os.path.basename(f)}")
    cfg = JobConfig(input=str(src), output=str(tmp / "out"), method=args.method, lvlm=lvlm,
                    batch_size=args.batch_size, limit=args.limit, accm_fallback=False).validate()
    files = storage.list_parquet_files(str(src))

    double = tmp / "in2"  # the same shards twice: the second job of the steady-state measurement
    double.mkdir()
    for f in files:
        for copy in ("a", "b"):
            shutil.copyfile(f, double / f"{copy}-{os.path.basename(f)}")
    cfg2 = JobConfig(**{**cfg.__dict__, "input": str(double), "output": str(tmp / "out2"),
                        "limit": None if args.limit is None else 2 * args.limit}).validate()

    loop = plain_loop(cfg, files, args.num_cpus)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    walls, items = [], []
    for c in (cfg, cfg2):
        t0 = time.perf_counter()
        summary = run_job(c)
        walls.append(time.perf_counter() - t0)
        items.append(summary["items"])
    ray.shutdown()
    ray_ips = items[0] / walls[0]
    steady = (items[1] - items[0]) / (walls[1] - walls[0])
    startup = walls[0] - items[0] / steady
    print()
    print(f"method={args.method} batch={args.batch_size} items={items[0]} cpus={args.num_cpus} "
          f"torch threads: loop {loop['threads']}, actors their CPU share (pipeline.batching)")
    print(f"plain loop  : {loop['items_per_s']:8.2f} items/s end to end ({loop['wall_s']:.1f} s), "
          f"{loop['items_per_s_no_load']:8.2f} items/s without model loads ({loop['load_s']:.1f} s)")
    print(f"Ray job     : {ray_ips:8.2f} items/s end to end ({walls[0]:.1f} s, incl. Ray Data start, actors, writes); "
          f"{items[1]} items: {items[1] / walls[1]:.2f} items/s ({walls[1]:.1f} s)")
    print(f"Ray steady  : {steady:8.2f} items/s without start-up (marginal over the second {items[1] - items[0]} "
          f"items); start-up {startup:.1f} s")
    print(f"ratio Ray / plain: {ray_ips / loop['items_per_s']:.2f} end to end, "
          f"{steady / loop['items_per_s_no_load']:.2f} without start-up (steady state vs the loop without its loads)")


if __name__ == "__main__":
    main()
