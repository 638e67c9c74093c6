"""Write Shapes-VQA to a local path, file:// or s3:// URL: the pipeline's own Parquet shards, or the same
items laid out as real benchmarks ship (POPE, MMBench), so the benchmark readers can be run end to end.

    python jobs/make_shapes_vqa.py --output s3://bucket/shapes_vqa/test --split test \\
        --num-items 1000 --seed 1234 --rows-per-shard 250

Item ``i`` of a split is ``pipeline.shapes.make_item(seed, split, i)``; shard ``k`` holds items
``k*M .. k*M+M-1`` and is named ``{split}-{k:05d}.parquet``. Same arguments, same bytes (for a given
pyarrow version), so shards can be regenerated instead of shipped. S3 credentials come from the
standard AWS environment variables, never from the command line.

``--format`` (default ``parquet``, the above) also writes ``--num-items`` questions as:

* ``llava-jsonl``: POPE as LLaVA ships it: the ``exist`` questions only (the k-th question is item ``5k+3``,
  the k-th ``exist`` item of the split, so yes/no alternate); ``llava_pope_test.jsonl`` (question_id, image,
  text + LLaVA's answer line, category), ``images/<id>.png`` and the labels in POPE's own files
  ``annotations/coco_pope_{adversarial,popular,random}.json`` (JSON lines: question_id, image, text, label).
  The category is ``k % 3``: on Shapes the three are just three equal splits, not POPE's samplings;
* ``hf-parquet``: the same questions as lmms-lab/POPE ships them (id, question_id, question, answer,
  image_source, image ``{bytes, path}``, category), ``{split}-{k:05d}-of-{n:05d}.parquet``;
* ``mmbench-tsv``: MMBench's TSV (``mmbench_shapes_{split}.tsv``): the ``color``, ``shape`` and ``count``
  questions (the k-th is item ``5*(k//3) + k%3``) as 4-way multiple choice: the answer and 3 distractors of the
  same vocabulary, shuffled (both drawn from the seed), ``answer`` the right letter, image as base64 PNG.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from actors.prompt import ANSWER_SUFFIXES  # noqa: E402
from pipeline import shapes, storage  # noqa: E402
from pipeline.schema import INPUT_SCHEMA  # noqa: E402
from pipeline.worlds import WORLDS  # noqa: E402

log = logging.getLogger("make_shapes_vqa")
GENERATOR_VERSION = "shapes-vqa/1"
FORMATS = ("parquet", "llava-jsonl", "hf-parquet", "mmbench-tsv")
SHORT_ANSWER = ANSWER_SUFFIXES["short"]  # LLaVA-1.5's line, as llava_pope_test.jsonl carries it
POPE_CATEGORIES = ("adversarial", "popular", "random")  # POPE's three label files; here three equal splits
POPE_QUESTIONS = "llava_pope_test.jsonl"  # the name LLaVA's scripts/v1_5/eval/pope.sh reads
MC_TYPES = ("color", "shape", "count")
MC_LETTERS = "ABCD"
MC_VOCABULARY = {
    "color": shapes.COLOR_NAMES,
    "shape": shapes.SHAPES,
    "count": tuple(str(n) for n in range(10)),  # a count outside 0-9 joins as the answer itself
}
MC_L2 = {"color": "attribute_recognition", "shape": "attribute_recognition", "count": "counting"}


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.parquet"


def shard_table(split: str, seed: int, start: int, stop: int, world: str = "v1") -> pa.Table:
    """Items ``start..stop-1`` of ``split`` as a table in the input schema, with provenance metadata
    (``world``: Shapes-VQA ``v1``, or ``v2`` = ``pipeline.shapes_v2``, the proving ground v2's benchmark)."""
    gen = WORLDS[world]
    rows = [gen.item_row(gen.make_item(seed, split, i)) for i in range(start, stop)]
    table = pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
    provenance = {"generator": GENERATOR_VERSION, "split": split, "seed": seed, "items": [start, stop]}
    if world != "v1":
        provenance["world"] = world
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
    world: str = "v1",
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
        data = parquet_bytes(shard_table(split, seed, start, stop, world))
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


# ----------------------------------------------------------------------------------------------------
# the benchmark layouts (POPE as LLaVA and lmms-lab ship it, MMBench's TSV)


def pope_item(seed: int, split: str, k: int) -> shapes.Item:
    """The k-th POPE-style question: the k-th ``exist`` item of the split (item ``5k+3``; yes for even k)."""
    item = shapes.make_item(seed, split, k * len(shapes.QUESTION_TYPES) + shapes.QUESTION_TYPES.index("exist"))
    assert item.question_type == "exist", item.id
    return item


def pope_category(k: int) -> str:
    return POPE_CATEGORIES[k % len(POPE_CATEGORIES)]


def image_name(item: shapes.Item) -> str:
    return f"{item.id}.png"


def pope_llava_files(split: str, num_items: int, seed: int) -> dict[str, bytes]:
    """POPE in LLaVA's layout: relative path -> bytes (question file, label files, PNG images)."""
    questions, labels = [], {c: [] for c in POPE_CATEGORIES}
    files: dict[str, bytes] = {}
    for k in range(num_items):
        item, category = pope_item(seed, split, k), pope_category(k)
        name = image_name(item)
        files[f"images/{name}"] = shapes.encode_png(shapes.render(item.objects))
        questions.append({"question_id": k + 1, "image": name, "text": f"{item.question}\n{SHORT_ANSWER}",
                          "category": category})
        # the label files number their own questions from 1 (eval_pope.py pairs them with answers by order)
        labels[category].append({"question_id": len(labels[category]) + 1, "image": name, "text": item.question,
                                 "label": item.answer})
    files[POPE_QUESTIONS] = "".join(json.dumps(q) + "\n" for q in questions).encode()
    for category, recs in labels.items():  # all three, even empty: no stale label file from a larger run
        files[f"annotations/coco_pope_{category}.json"] = "".join(json.dumps(r) + "\n" for r in recs).encode()
    return files


# lmms-lab/POPE's columns, in its order (README dataset_info), as `datasets` writes them
HF_POPE_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("question_id", pa.string()),
    pa.field("question", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("image_source", pa.string()),
    pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
    pa.field("category", pa.string()),
])
_HF_FEATURES = {name: {"dtype": "string", "_type": "Value"} for name in HF_POPE_SCHEMA.names}
_HF_FEATURES["image"] = {"_type": "Image"}


def hf_shard_name(split: str, shard: int, n_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{n_shards:05d}.parquet"


def pope_hf_table(split: str, seed: int, start: int, stop: int) -> pa.Table:
    """POPE-style questions ``start..stop-1`` as lmms-lab/POPE rows (question_id as in the LLaVA file)."""
    rows = []
    for k in range(start, stop):
        item = pope_item(seed, split, k)
        rows.append({
            "id": str(k),
            "question_id": str(k + 1),
            "question": item.question,
            "answer": item.answer,
            "image_source": item.id,
            "image": {"bytes": shapes.encode_png(shapes.render(item.objects)), "path": image_name(item)},
            "category": pope_category(k),
        })
    table = pa.Table.from_pylist(rows, schema=HF_POPE_SCHEMA)
    provenance = {"generator": GENERATOR_VERSION, "format": "hf-parquet", "split": split, "seed": seed,
                  "items": [start, stop]}
    return table.replace_schema_metadata({
        "huggingface": json.dumps({"info": {"features": _HF_FEATURES}}),  # `datasets` decodes `image` as Image
        "shapes_vqa": json.dumps(provenance, sort_keys=True),
    })


def mc_item(seed: int, split: str, k: int) -> shapes.Item:
    """The k-th multiple-choice question: color, shape, count, color, ... (item ``5*(k//3) + k%3``)."""
    return shapes.make_item(seed, split, (k // len(MC_TYPES)) * len(shapes.QUESTION_TYPES) + k % len(MC_TYPES))


def mc_options(seed: int, split: str, item_index: int, qtype: str, answer: str) -> tuple[list[str], str]:
    """(four option texts, the right letter): the answer and 3 distractors of its type's vocabulary, shuffled.

    Drawn from their own stream (``[seed, split, item, 1]``), so the item itself is unchanged. No option is a
    substring of another (MMBench's ``can_infer_text`` matches option texts inside a free-form reply)."""
    rng = np.random.default_rng([seed, shapes.SPLITS.index(split), item_index, 1])
    pool = [v for v in MC_VOCABULARY[qtype] if v != answer]
    options = [answer]
    for i in rng.permutation(len(pool)):
        if len(options) == len(MC_LETTERS):
            break
        if not any(pool[i] in o or o in pool[i] for o in options):
            options.append(pool[i])
    options = [options[i] for i in rng.permutation(len(options))]
    return options, MC_LETTERS[options.index(answer)]


MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "split")  # MMBench_DEV_EN.tsv's columns (less its empty 'comment')


def mmbench_tsv(split: str, num_items: int, seed: int) -> bytes:
    """MMBench's TSV layout: one row per question, image inline as base64 PNG, no hints."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(MMBENCH_COLUMNS)
    for k in range(num_items):
        item = mc_item(seed, split, k)
        index = int(item.id.rsplit("-", 1)[1])
        options, letter = mc_options(seed, split, index, item.question_type, item.answer)
        image = base64.b64encode(shapes.encode_png(shapes.render(item.objects))).decode("ascii")
        writer.writerow([k, item.question, "", *options, letter, item.question_type, image, "shapes_vqa",
                         MC_L2[item.question_type], split])
    return out.getvalue().encode()


def mmbench_name(split: str) -> str:
    return f"mmbench_shapes_{split}.tsv"


def write_benchmark(
    output: str,
    fmt: str,
    split: str,
    num_items: int,
    seed: int,
    rows_per_shard: int = 1000,
    s3_endpoint: str | None = None,
) -> list[str]:
    """Write ``num_items`` questions in benchmark format ``fmt``; returns the written URLs (data files first).

    ``parquet`` is ``write_shards``; ``hf-parquet`` shards by ``rows_per_shard``; the others write one file
    (plus images and label files for ``llava-jsonl``), as the benchmarks ship."""
    if fmt == "parquet":
        return write_shards(output, split, num_items, seed, rows_per_shard, s3_endpoint=s3_endpoint)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(shapes.SPLITS)}")
    if num_items < 1 or rows_per_shard < 1:
        raise ValueError("--num-items and --rows-per-shard must be positive")
    options = {"s3_endpoint": s3_endpoint} if s3_endpoint else {}
    base = output.rstrip("/") + "/"
    if fmt == "llava-jsonl":
        files = pope_llava_files(split, num_items, seed)
        order = [POPE_QUESTIONS, *sorted(n for n in files if n != POPE_QUESTIONS)]
        files = {name: files[name] for name in order}
    elif fmt == "hf-parquet":
        n_shards = math.ceil(num_items / rows_per_shard)
        files = {}
        for shard in range(n_shards):
            start, stop = shard * rows_per_shard, min(num_items, (shard + 1) * rows_per_shard)
            files[hf_shard_name(split, shard, n_shards)] = parquet_bytes(pope_hf_table(split, seed, start, stop))
    else:
        files = {mmbench_name(split): mmbench_tsv(split, num_items, seed)}
    written = []
    for name, data in files.items():
        url = base + name
        storage.write_bytes(url, data, **options)
        log.debug("wrote %s (%d bytes)", storage.redact(url), len(data))
        written.append(url)
    n_images = sum(name.startswith("images/") for name in files)
    log.info("wrote %s under %s: %d questions of split %r, %d files (%d images), %d bytes", fmt,
             storage.redact(output), num_items, split, len(files), n_images, sum(len(d) for d in files.values()))
    if fmt == "hf-parquet":
        try:
            existing = storage.list_parquet_files(output, **options)
        except FileNotFoundError:
            existing = []
        stale = [u for u in existing if u.rsplit("/", 1)[-1] not in files]
        if stale:
            log.warning("%d other parquet files exist under %s (e.g. %s); delete them if they are stale",
                        len(stale), storage.redact(output), storage.redact(stale[0]))
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate Shapes-VQA Parquet shards (pipeline input format), or the same items laid out as "
        "POPE or MMBench ship (--format), to a path, file:// or s3:// URL.",
        epilog="S3 credentials and region are read from the standard AWS environment variables "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL).",
    )
    parser.add_argument("--output", required=True,
                        help="destination directory: a local path, file:///abs/dir or s3://bucket/prefix")
    parser.add_argument("--split", required=True, choices=shapes.SPLITS,
                        help="which split to draw; splits never share a scene (chosen by the scene hash)")
    parser.add_argument("--num-items", type=int, required=True, help="number of rows (questions) to write")
    parser.add_argument("--format", default="parquet", choices=FORMATS,
                        help="parquet: the pipeline's input shards (default); llava-jsonl: POPE as LLaVA ships it "
                        "(exist questions, llava_pope_test.jsonl + images/ + annotations/coco_pope_*.json); "
                        "hf-parquet: the same as lmms-lab/POPE's Parquet; mmbench-tsv: color/shape/count "
                        "questions as 4-way multiple choice in MMBench's TSV (base64 PNG images)")
    parser.add_argument("--world", default="v1", choices=sorted(WORLDS),
                        help="v1: Shapes-VQA (64x64, one object per patch); v2: Shapes v2 (96x96, 144 patches, "
                        "20-28 objects of 2x2 patches; pipeline/shapes_v2.py), parquet format only (default v1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="generator seed; the same seed and arguments give byte-identical shards (default 0)")
    parser.add_argument("--rows-per-shard", type=int, default=1000,
                        help="rows per Parquet file, named {split}-{shard:05d}.parquet (hf-parquet: "
                        "{split}-{shard:05d}-of-{n:05d}.parquet; the other formats write one file) (default 1000)")
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
    if args.world != "v1" and args.format != "parquet":
        parser.error("--world v2 writes the pipeline's parquet format only")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    # no-op when the host (Ray, pytest) already configured logging; our own records are redacted either way
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(args.log_level)
    if not any(isinstance(f, storage.RedactingFilter) for f in log.filters):
        log.addFilter(storage.RedactingFilter())
    if args.format != "parquet":
        written = write_benchmark(args.output, args.format, args.split, args.num_items, args.seed,
                                  args.rows_per_shard, s3_endpoint=args.s3_endpoint)
        log.info("done: %d %s questions of split %r (seed %d) under %s", args.num_items, args.format,
                 args.split, args.seed, storage.redact(args.output))
        return written
    written = write_shards(args.output, args.split, args.num_items, args.seed, args.rows_per_shard,
                           s3_endpoint=args.s3_endpoint, world=args.world)
    log.info("done: %d rows of split %r (seed %d) in %d shards under %s", args.num_items, args.split,
             args.seed, len(written), storage.redact(args.output))
    return written


if __name__ == "__main__":
    main()
