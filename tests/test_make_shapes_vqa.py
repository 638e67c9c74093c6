"""The Shapes-VQA writer job: help text, determinism, schema, local and s3:// outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import make_shapes_vqa as job
from pipeline import shapes, storage
from pipeline.schema import INPUT_SCHEMA, validate_input_schema, validate_unique_ids

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "make_shapes_vqa.py"


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--output", "--split", "--num-items", "--seed", "--rows-per-shard", "--s3-endpoint", "--log-level"):
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


@pytest.mark.parametrize("bad", [["--split", "dev"], ["--num-items", "0"], ["--rows-per-shard", "-1"]])
def test_rejects_bad_arguments(bad, tmp_path):
    args = {"--output": str(tmp_path), "--split": "test", "--num-items": "3", "--rows-per-shard": "2"}
    args.update(dict(zip(bad[::2], bad[1::2], strict=True)))
    with pytest.raises(SystemExit):
        job.parse_args([x for kv in args.items() for x in kv])


def test_bundled_demo_data_is_current(tmp_path):
    """data/shapes_vqa/test must equal what its README command produces (content, not bytes: pyarrow may differ)."""
    bundled = sorted((ROOT / "data" / "shapes_vqa" / "test").glob("*.parquet"))
    assert [p.name for p in bundled] == ["test-00000.parquet", "test-00001.parquet"]
    assert sum(p.stat().st_size for p in bundled) < 300_000
    fresh = job.write_shards(str(tmp_path), "test", 200, seed=1234, rows_per_shard=100)
    for path, url in zip(bundled, fresh, strict=True):
        assert pq.read_table(path).equals(pq.read_table(url)), path.name
