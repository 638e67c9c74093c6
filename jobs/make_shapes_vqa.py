"""Write Shapes-VQA shards (Parquet, the pipeline's input contract) to a local path, file:// or s3:// URL.

    python jobs/make_shapes_vqa.py --output s3://bucket/shapes_vqa/test --split test \\
        --num-items 1000 --seed 1234 --rows-per-shard 250

Item ``i`` of a split is ``pipeline.shapes.make_item(seed, split, i)``; shard ``k`` holds items
``k*M .. k*M+M-1`` and is named ``{split}-{k:05d}.parquet``. Same arguments, same bytes (for a given
pyarrow version), so shards can be regenerated instead of shipped. S3 credentials come from the
standard AWS environment variables, never from the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline import shapes, storage  # noqa: E402
from pipeline.schema import INPUT_SCHEMA  # noqa: E402

log = logging.getLogger("make_shapes_vqa")
GENERATOR_VERSION = "shapes-vqa/1"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.parquet"


def shard_table(split: str, seed: int, start: int, stop: int) -> pa.Table:
    """Items ``start..stop-1`` of ``split`` as a table in the input schema, with provenance metadata."""
    rows = [shapes.item_row(shapes.make_item(seed, split, i)) for i in range(start, stop)]
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    provenance = {"generator": GENERATOR_VERSION, "split": split, "seed": seed, "items": [start, stop]}
    return table.replace_schema_metadata({"shapes_vqa": json.dumps(provenance, sort_keys=True)})


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # PNG bytes are already compressed; zstd still shrinks the text columns. No timestamps are written.
    pq.write_table(table, sink, compression="zstd", row_group_size=len(table) or None)
    return sink.getvalue().to_pybytes()


def write_shards(
    output: str,
    split: str,
    num_items: int,
    seed: int,
    rows_per_shard: int,
    s3_endpoint: str | None = None,
) -> list[str]:
    """Generate and write every shard; returns the written URLs in shard order."""
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(shapes.SPLITS)}")
    if num_items < 1 or rows_per_shard < 1:
        raise ValueError("--num-items and --rows-per-shard must be positive")
    options = {"s3_endpoint": s3_endpoint} if s3_endpoint else {}
    n_shards = math.ceil(num_items / rows_per_shard)
    written = []
    for shard in range(n_shards):
        start, stop = shard * rows_per_shard, min(num_items, (shard + 1) * rows_per_shard)
        data = parquet_bytes(shard_table(split, seed, start, stop))
        url = output.rstrip("/") + "/" + shard_name(split, shard)
        storage.write_bytes(url, data, **options)
        log.info("wrote %s: items %d..%d (%d rows, %d bytes)", storage.redact(url), start, stop - 1,
                 stop - start, len(data))
        written.append(url)
    try:  # a previous, larger run may have left shards that now silently join the dataset
        existing = storage.list_parquet_files(output, **options)
    except FileNotFoundError:
        existing = []
    names = {u.rsplit("/", 1)[-1] for u in written}
    stale = [u for u in existing if u.rsplit("/", 1)[-1].startswith(f"{split}-") and u.rsplit("/", 1)[-1] not in names]
    if stale:
        log.warning("%d other %s shards exist under %s (e.g. %s); delete them if they are stale",
                    len(stale), split, storage.redact(output), storage.redact(stale[0]))
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate Shapes-VQA Parquet shards (pipeline input format) to a path, file:// or s3:// URL.",
        epilog="S3 credentials and region are read from the standard AWS environment variables "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL).",
    )
    parser.add_argument("--output", required=True,
                        help="destination directory: a local path, file:///abs/dir or s3://bucket/prefix")
    parser.add_argument("--split", required=True, choices=shapes.SPLITS,
                        help="which split to draw; splits never share a scene (chosen by the scene hash)")
    parser.add_argument("--num-items", type=int, required=True, help="number of rows (questions) to write")
    parser.add_argument("--seed", type=int, default=0,
                        help="generator seed; the same seed and arguments give byte-identical shards (default 0)")
    parser.add_argument("--rows-per-shard", type=int, default=1000,
                        help="rows per Parquet file, named {split}-{shard:05d}.parquet (default 1000)")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3 endpoint URL for s3:// outputs, e.g. http://127.0.0.1:9000 "
                        "(default: AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging verbosity (default INFO)")
    args = parser.parse_args(argv)
    if args.num_items < 1:
        parser.error("--num-items must be >= 1")
    if args.rows_per_shard < 1:
        parser.error("--rows-per-shard must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    # no-op when the host (Ray, pytest) already configured logging; our own records are redacted either way
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(args.log_level)
    if not any(isinstance(f, storage.RedactingFilter) for f in log.filters):
        log.addFilter(storage.RedactingFilter())
    written = write_shards(args.output, args.split, args.num_items, args.seed, args.rows_per_shard,
                           s3_endpoint=args.s3_endpoint)
    log.info("done: %d rows of split %r (seed %d) in %d shards under %s", args.num_items, args.split,
             args.seed, len(written), storage.redact(args.output))
    return written


if __name__ == "__main__":
    main()
