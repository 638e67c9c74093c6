"""The Shapes-VQA writer job: help text, determinism, schema, local and s3:// outputs."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import make_shapes_vqa as job
from pipeline import shapes, storage
from pipeline.schema import INPUT_SCHEMA, validate_input_schema, validate_unique_ids

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "make_shapes_vqa.py"


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--output", "--split", "--num-items", "--seed", "--rows-per-shard", "--s3-endpoint", "--log-level",
                   "--format", "--world"):
        assert option in out
    assert "s3://" in out and "AWS_ACCESS_KEY_ID" in out


def test_two_runs_are_byte_identical_and_valid(tmp_path, caplog):
    args = ["--split", "val", "--num-items", "23", "--seed", "7", "--rows-per-shard", "10", "--log-level", "INFO"]
    first = job.main(["--output", str(tmp_path / "a"), *args])
    second = job.main(["--output", f"file://{tmp_path}/b", *args])
    names = [u.rsplit("/", 1)[-1] for u in first]
    assert names == ["val-00000.parquet", "val-00001.parquet", "val-00002.parquet"]
    assert [u.rsplit("/", 1)[-1] for u in second] == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "wrote" in caplog.text and "val-00002.parquet" in caplog.text
    tables = [pq.read_table(tmp_path / "a" / n) for n in names]
    assert [t.num_rows for t in tables] == [10, 10, 3]
    ids = []
    for name, table in zip(names, tables, strict=True):
        validate_input_schema(table.schema, name)
        assert table.schema.remove_metadata().equals(INPUT_SCHEMA)
        ids += table.column("id").to_pylist()
    validate_unique_ids(ids, "all shards")
    # rows are exactly the generator's items, in order
    assert tables[2].to_pylist()[0] == shapes.item_row(shapes.make_item(7, "val", 20))
    assert all(len(a) == 10 for a in tables[0].column("answers").to_pylist())


def test_world_v2_shards_hold_v2_items(tmp_path):
    from pipeline import shapes_v2

    (url,) = job.main(["--output", str(tmp_path), "--split", "test", "--num-items", "3", "--world", "v2"])
    table = pq.read_table(url)
    validate_input_schema(table.schema, url)
    assert table.to_pylist() == [shapes_v2.item_row(shapes_v2.make_item(0, "test", i)) for i in range(3)]
    assert json.loads(table.schema.metadata[b"shapes_vqa"])["world"] == "v2"


def test_other_seed_differs_and_stale_shards_warn(tmp_path, caplog):
    job.write_shards(str(tmp_path), "test", 4, seed=1, rows_per_shard=2)
    a = (tmp_path / "test-00000.parquet").read_bytes()
    job.write_shards(str(tmp_path), "test", 2, seed=2, rows_per_shard=2)
    assert (tmp_path / "test-00000.parquet").read_bytes() != a
    assert "other test shards exist" in caplog.text


def test_writes_to_s3(s3_server, tmp_bucket, tmp_path):
    # the endpoint given explicitly, as on the command line (credentials from the env)
    urls = job.main(["--output", f"s3://{tmp_bucket}/shapes/test", "--split", "test", "--num-items", "5",
                     "--seed", "3", "--rows-per-shard", "3", "--s3-endpoint", s3_server.endpoint])
    assert s3_server.keys(tmp_bucket) == ["shapes/test/test-00000.parquet", "shapes/test/test-00001.parquet"]
    assert storage.list_parquet_files(f"s3://{tmp_bucket}/shapes/test") == urls
    fs, path = storage.resolve(urls[1])
    table = pq.read_table(path, filesystem=fs)
    validate_input_schema(table.schema, urls[1])
    local = job.write_shards(str(tmp_path), "test", 5, seed=3, rows_per_shard=3)
    assert storage.read_bytes(urls[1]) == Path(local[1]).read_bytes()


@pytest.mark.parametrize("bad", [["--split", "dev"], ["--num-items", "0"], ["--rows-per-shard", "-1"],
                                 ["--format", "llava-json"], ["--world", "v3"],
                                 ["--world", "v2", "--format", "mmbench-tsv"]])
def test_rejects_bad_arguments(bad, tmp_path):
    args = {"--output": str(tmp_path), "--split": "test", "--num-items": "3", "--rows-per-shard": "2"}
    args.update(dict(zip(bad[::2], bad[1::2], strict=True)))
    with pytest.raises(SystemExit):
        job.parse_args([x for kv in args.items() for x in kv])


@pytest.mark.parametrize("folder, world", [("shapes_vqa", "v1"), ("shapes_v2", "v2")])
def test_bundled_demo_data_is_current(tmp_path, folder, world):
    """data/<folder>/test must equal what its README command produces (content, not bytes: pyarrow may differ);
    data/shapes_v2/test is the embedded default's input."""
    bundled = sorted((ROOT / "data" / folder / "test").glob("*.parquet"))
    assert [p.name for p in bundled] == ["test-00000.parquet", "test-00001.parquet"]
    assert sum(p.stat().st_size for p in bundled) < 500_000
    fresh = job.write_shards(str(tmp_path), "test", 200, seed=1234, rows_per_shard=100, world=world)
    for path, url in zip(bundled, fresh, strict=True):
        assert pq.read_table(path).equals(pq.read_table(url)), path.name


# ----------------------------------------------------------------------------------------------------
# the benchmark layouts (--format llava-jsonl | hf-parquet | mmbench-tsv) and the bundled copies

BENCH = ROOT / "data" / "shapes_vqa" / "benchmarks"
BUNDLED = {"pope": "llava-jsonl", "pope_hf": "hf-parquet", "mmbench": "mmbench-tsv"}


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["llava-jsonl", "hf-parquet", "mmbench-tsv"])
def test_benchmark_formats_are_byte_identical(fmt, tmp_path):
    args = ["--format", fmt, "--split", "val", "--num-items", "7", "--seed", "5", "--rows-per-shard", "4",
            "--log-level", "WARNING"]
    first = job.main(["--output", str(tmp_path / "a"), *args])
    second = job.main(["--output", f"file://{tmp_path}/b/", *args])
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert list(a) == list(b) and len(first) == len(second) == len(a)
    assert all(a[n].read_bytes() == b[n].read_bytes() for n in a)
    other = job.write_benchmark(str(tmp_path / "c"), fmt, "val", 7, seed=6, rows_per_shard=4)
    assert [Path(u).read_bytes() for u in other] != [Path(u).read_bytes() for u in first]
    expected = {"llava-jsonl": 1 + 3 + 7, "hf-parquet": 2, "mmbench-tsv": 1}[fmt]
    assert len(a) == expected, list(a)


def test_pope_layout_parses(tmp_path):
    job.write_benchmark(str(tmp_path), "llava-jsonl", "test", 9, seed=2)
    questions = [json.loads(line) for line in (tmp_path / "llava_pope_test.jsonl").read_text().splitlines()]
    assert [q["question_id"] for q in questions] == list(range(1, 10))
    assert [q["category"] for q in questions] == ["adversarial", "popular", "random"] * 3
    labels = {}
    for category in ("adversarial", "popular", "random"):
        recs = [json.loads(x) for x in (tmp_path / "annotations" / f"coco_pope_{category}.json").read_text().splitlines()]
        assert [r["question_id"] for r in recs] == [1, 2, 3]  # POPE's label files number their own questions
        labels.update({(category, r["image"], r["text"]): r["label"] for r in recs})
    for k, q in enumerate(questions):
        item = shapes.make_item(2, "test", 5 * k + 3)  # the k-th exist item of the split
        assert item.question_type == "exist"
        assert q["text"] == item.question + "\nAnswer the question using a single word or phrase."
        assert q["image"] == f"{item.id}.png"
        assert labels[(q["category"], q["image"], item.question)] == item.answer == ("yes", "no")[k % 2]
        png = (tmp_path / "images" / q["image"]).read_bytes()
        assert png == shapes.item_row(item)["image"]
        assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_pope_hf_layout_parses(tmp_path):
    urls = job.write_benchmark(str(tmp_path), "hf-parquet", "test", 5, seed=2, rows_per_shard=3)
    assert [Path(u).name for u in urls] == ["test-00000-of-00002.parquet", "test-00001-of-00002.parquet"]
    table = pa.concat_tables([pq.read_table(u) for u in urls])
    assert table.schema.names == ["id", "question_id", "question", "answer", "image_source", "image", "category"]
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    rows = table.to_pylist()
    llava = job.pope_llava_files("test", 5, 2)
    for k, row in enumerate(rows):
        item = job.pope_item(2, "test", k)
        assert (row["question_id"], row["question"], row["answer"]) == (str(k + 1), item.question, item.answer)
        assert row["image"]["bytes"] == llava[f"images/{item.id}.png"]
        assert row["category"] == job.POPE_CATEGORIES[k % 3]


def test_mmbench_layout_parses(tmp_path):
    (url,) = job.write_benchmark(str(tmp_path), "mmbench-tsv", "test", 12, seed=2)
    assert Path(url).name == "mmbench_shapes_test.tsv"
    csv.field_size_limit(sys.maxsize)
    rows = list(csv.DictReader(io.StringIO(Path(url).read_text()), delimiter="\t"))
    assert list(rows[0]) == list(job.MMBENCH_COLUMNS)
    assert [r["category"] for r in rows] == ["color", "shape", "count"] * 4
    for k, row in enumerate(rows):
        item = job.mc_item(2, "test", k)
        assert int(row["index"]) == k and row["question"] == item.question and row["hint"] == ""
        options = [row[x] for x in "ABCD"]
        assert len(set(options)) == 4 and row[row["answer"]] == item.answer
        assert not any(a in b for a in options for b in options if a != b)  # can_infer_text stays unambiguous
        assert all(o in job.MC_VOCABULARY[item.question_type] or o == item.answer for o in options)
        png = base64.b64decode(row["image"], validate=True)
        assert png == shapes.item_row(item)["image"]
        assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_benchmark_formats_write_to_s3(s3_server, tmp_bucket, tmp_path):
    urls = job.main(["--output", f"s3://{tmp_bucket}/pope", "--format", "llava-jsonl", "--split", "test",
                     "--num-items", "2", "--seed", "3", "--s3-endpoint", s3_server.endpoint])
    local = job.write_benchmark(str(tmp_path), "llava-jsonl", "test", 2, seed=3)
    assert s3_server.keys(tmp_bucket) == sorted(f"pope/{Path(u).relative_to(tmp_path)}" for u in local)
    assert [storage.read_bytes(u) for u in urls] == [Path(u).read_bytes() for u in local]


def test_bundled_benchmarks_are_current(tmp_path):
    """data/shapes_vqa/benchmarks/* must equal what its README commands produce (Parquet: content)."""
    total = sum(p.stat().st_size for p in BENCH.rglob("*") if p.is_file())
    assert total < 1_000_000
    for folder, fmt in BUNDLED.items():
        job.write_benchmark(str(tmp_path / folder), fmt, "test", 60, seed=1234)
        bundled, fresh = _files(BENCH / folder), _files(tmp_path / folder)
        assert list(bundled) == list(fresh), folder
        for name, path in bundled.items():
            if name.endswith(".parquet"):
                assert pq.read_table(path).equals(pq.read_table(fresh[name]), check_metadata=True), name
            else:
                assert path.read_bytes() == fresh[name].read_bytes(), f"{folder}/{name}"


def _contract_rows(url: str, source) -> list[dict]:
    from pipeline.sources import iter_tables

    return [r for t in iter_tables(url, source) for r in t.to_pylist()]


def test_bundled_pope_reads_as_contract_rows():
    from pipeline.sources import Source
    from pipeline.tasks import pope

    root = BENCH / "pope"
    rows = _contract_rows(str(root / "llava_pope_test.jsonl"),
                          Source(fmt="llava-jsonl", task="pope", image_root=str(root / "images"),
                                 annotations=str(root / "annotations")))
    hf = _contract_rows(str(BENCH / "pope_hf" / "test-00000-of-00001.parquet"), Source(fmt="hf-parquet", task="pope"))
    assert len(rows) == len(hf) == 60
    assert all(r["input_error"] is None for r in rows + hf)
    for k, (row, hrow) in enumerate(zip(rows, hf, strict=True)):
        item = job.pope_item(1234, "test", k)
        assert row["answers"] == hrow["answers"] == [item.answer]
        assert row["id"] == hrow["id"] == f"{job.POPE_CATEGORIES[k % 3]}-{k + 1}"
        assert row["question"] == hrow["question"] == item.question + "\nAnswer the question using a single word or phrase."
        assert row["question_type"] == hrow["question_type"] == job.POPE_CATEGORIES[k % 3]
        assert row["image"] is None and Path(row["image_uri"]).read_bytes() == hrow["image"]
        assert hrow["image_uri"] is None
    # balanced as POPE is: per category 10 yes / 10 no; a model that always says yes scores 50%
    yes = [pope.score("Yes", r["answers"]) for r in rows]
    assert sum(yes) == 30


def test_bundled_mmbench_reads_as_contract_rows():
    from pipeline.sources import Source
    from pipeline.tasks import mmbench

    rows = _contract_rows(str(BENCH / "mmbench" / "mmbench_shapes_test.tsv"), Source(fmt="mmbench-tsv", task="mmbench"))
    assert len(rows) == 60 and all(r["input_error"] is None for r in rows)
    for k, row in enumerate(rows):
        item = job.mc_item(1234, "test", k)
        letter = row["answers"][0]
        assert row["id"] == str(k) and row["index"] == k and row["question_type"] == item.question_type
        assert row[letter] == item.answer and row["answers"][1:] == [row[x] for x in "ABCD"]
        assert row["question"].startswith(item.question + "\nA. ")
        assert row["image"] == shapes.item_row(item)["image"]
        # the shipped model answers with the word, not the letter: MMBench's can_infer_text still scores it
        assert mmbench.score(item.answer, row["answers"]) == 1.0
        assert mmbench.score(letter, row["answers"]) == 1.0
        wrong = next(row[x] for x in "ABCD" if x != letter)
        assert mmbench.score(wrong, row["answers"]) == 0.0
