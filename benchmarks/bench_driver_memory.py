"""The driver's memory does not grow with the data set: its peak RSS over runs of growing row counts.

    .venv/bin/python benchmarks/bench_driver_memory.py [--rows 10000,100000,1000000] [--shard-rows 20000]
    .venv/bin/python benchmarks/bench_driver_memory.py --format llava-jsonl --rows 100000   # a user's question file

Each run writes N rows of tiny generated images (8x8 PNG) into shards of ``--shard-rows`` rows and runs the
main job (``run_job``, method ``none``) on a private local Ray, this process being the driver; a thread
samples the driver's RSS every 50 ms. The tiers are the real Ray Data graph (read, decode, both actor pools,
scoring, the writer stage, per-shard finalize tasks and markers) with their model calls replaced by a
constant answer (``EchoCaptionerTier``/``EchoLVLMTier`` below): what is measured is the driver and the output
path, and a million rows through a model would take hours on a laptop. Prints one line per run and a table.
``--format llava-jsonl``: one POPE question file of N rows (LLaVA's layout, images as files under an image
root, labels in ``coco_pope_*.json``), run as ``--task pope``: the benchmark reader's path.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.lvlm_tier import LVLMTier  # noqa: E402
from pipeline.stages import CAPTIONED_SCHEMA, CaptionerTier, _table  # noqa: E402


class EchoCaptionerTier(CaptionerTier):
    """The captioner tier's contract without its model: every row keeps all 4 visual tokens, no caption."""

    def __init__(self, cfg, num_gpus: float = 0.0) -> None:
        self.cfg = cfg

    def __call__(self, batch):
        rows = batch.to_pylist()
        for r in rows:
            if r["error"] is None:
                r.update(visual_tokens_total=4, keep_tokens=4, flops_vision=0.0, flops_pruner=0.0,
                         flops_captioner=0.0, flops_selector=0.0, latency_captioner_s=0.0)
        return _table(rows, CAPTIONED_SCHEMA)


class EchoLVLMTier(LVLMTier):
    """The LVLM tier's contract without its model: a constant answer, zero FLOPs; ``ms_per_row`` of sleep
    stands in for a model's time (then the LVLM, not the writer, is the bottleneck, as in real runs)."""

    ms_per_row: float = 0.0

    def __init__(self, cfg, num_gpus: float = 0.0) -> None:
        self.cfg, self.helpers = cfg, []

    def _run(self, rows) -> None:
        time.sleep(self.ms_per_row * len(rows) / 1000)
        for r in rows:
            r.update(prediction="yes", flops_projector=0.0, flops_llm_prefill=0.0, flops_llm_decode=0.0,
                     flops_total=0.0, flops_reference_total=1.0)


def write_input(root: Path, rows: int, shard_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.schema import INPUT_SCHEMA

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    root.mkdir(parents=True)
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        table = pa.table({"id": [f"r{start + i}" for i in range(n)], "image": [png] * n,
                          "question": ["What color is the square?"] * n, "answers": [None] * n},
                         schema=pa.schema([f for f in INPUT_SCHEMA if f.name in ("id", "image", "question",
                                                                                   "answers")]))
        pq.write_table(table, root / f"part-{start // shard_rows:05d}.parquet")


def write_question_file(root: Path, rows: int) -> dict[str, str]:
    """A POPE-style question file of ``rows`` questions over 10 image files, with its label files; returns the
    job's --input / --image-root / --annotations."""
    import json

    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for k in range(10):
        Image.new("RGB", (8, 8), (20 * k, 30, 30)).save(root / "images" / f"{k}.png")
    categories = ("adversarial", "popular", "random")
    labels: dict[str, list[str]] = {c: [] for c in categories}
    with open(root / "llava_pope_test.jsonl", "w") as questions:
        for i in range(rows):
            category, text = categories[i % 3], f"Is there a red square number {i}?"
            questions.write(json.dumps({"question_id": i + 1, "image": f"{i % 10}.png", "category": category,
                                        "text": text + "\nAnswer the question using a single word or phrase."})
                            + "\n")
            labels[category].append(json.dumps({"question_id": i + 1, "image": f"{i % 10}.png", "text": text,
                                                "label": "yes" if i % 2 else "no"}))
    for category, lines in labels.items():
        (root / "annotations" / f"coco_pope_{category}.json").write_text("\n".join(lines) + "\n")
    return {"input": str(root / "llava_pope_test.jsonl"), "image_root": str(root / "images"),
            "annotations": str(root / "annotations"), "task": "pope"}


class PeakRSS:
    """Peak resident memory of this process, sampled by a thread."""

    def __init__(self, every_s: float = 0.05) -> None:
        import psutil

        self.proc, self.every_s, self.peak, self._stop = psutil.Process(), every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000,1000000", help="comma-separated row counts, one run each")
    parser.add_argument("--shard-rows", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--part-rows", type=int, default=1024)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--lvlm-ms-per-row", type=float, default=0.0, help="model time to stand in for (sleep)")
    parser.add_argument("--format", choices=("parquet", "llava-jsonl"), default="parquet",
                        help="input: the project's Parquet shards, or one LLaVA question file (--task pope)")
    args = parser.parse_args()
    EchoLVLMTier.ms_per_row = args.lvlm_ms_per_row

    import ray

    from actors.tiny import build_tiny_llava
    from pipeline.config import JobConfig
    from pipeline.graph import run_job

    tmp = Path(tempfile.mkdtemp(prefix="bench-driver-memory-"))
    build_tiny_llava(tmp / "lvlm", vision_layers=2, text_layers=1)  # only its existence is checked
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            src, out = tmp / f"in-{rows}", tmp / f"out-{rows}"
            if args.format == "parquet":
                write_input(src, rows, args.shard_rows)
                where = {"input": str(src)}
            else:
                where = write_question_file(src, rows)
            cfg = JobConfig(**where, output=str(out), method="none", lvlm=str(tmp / "lvlm"),
                            batch_size=args.batch_size, part_rows=args.part_rows, accm_fallback=False).validate()
            with PeakRSS() as rss:
                before = rss.peak
                t0 = time.perf_counter()
                summary = run_job(cfg, captioner=EchoCaptionerTier, lvlm=EchoLVLMTier)
                wall = time.perf_counter() - t0
            assert summary["items"] == rows and summary["errors"] == 0, summary
            results.append((rows, before, rss.peak, wall))
            print(f"{args.format} lvlm_ms_per_row={args.lvlm_ms_per_row:g} rows={rows:>9,d}  driver RSS before {before / 2**20:7.1f} MiB  peak {rss.peak / 2**20:7.1f} MiB"
                  f"  (+{(rss.peak - before) / 2**20:6.1f})  wall {wall:7.1f} s  {rows / wall:8.0f} rows/s", flush=True)
            shutil.rmtree(src)
            shutil.rmtree(out)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| rows | driver peak RSS (MiB) | growth during the run (MiB) | wall (s) | rows/s |")
    print("|---:|---:|---:|---:|---:|")
    for rows, before, peak, wall in results:
        print(f"| {rows:,d} | {peak / 2**20:.0f} | {(peak - before) / 2**20:.0f} | {wall:.0f} | {rows / wall:.0f} |")


if __name__ == "__main__":
    main()
