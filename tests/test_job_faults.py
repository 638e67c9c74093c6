"""Whole jobs against an unwell object store: the real moto S3 server behind ``tests/faultproxy.py``, a real
local Ray (2 CPUs), tiny random models. Input and output both go through the proxy.

- a 20 s outage in the middle of a main-job run and of a sweep run: exit 0, every row once, no error rows;
- 10% of the requests answered 503 SlowDown for a whole run: the same, and the retries are in the summary;
- an outage longer than the retry budget: exit code 3 naming the object, then ``--resume`` completes;
- parts left empty or truncated by an interrupted write: ``--resume`` redoes their rows;
- permanent faults (writes denied, a missing bucket): refused within seconds, nothing half-written.
"""

from __future__ import annotations

import json
import threading
import time

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from pipeline import shapes
from pipeline.schema import INPUT_SCHEMA

pytestmark = pytest.mark.slow

SHARDS, ROWS = 3, 12


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory) -> str:
    from actors.tiny import build_tiny_llava

    root = tmp_path_factory.mktemp("fault-models")
    build_tiny_llava(root / "lvlm", vision_layers=2, text_layers=1)
    return str(root / "lvlm")


@pytest.fixture
def dataset(s3_server, tmp_bucket) -> dict[str, list[str]]:
    """SHARDS input shards of ROWS rows in the bucket (written straight to moto, not through the proxy)."""
    fs = pa.fs.S3FileSystem(endpoint_override=s3_server.endpoint.split("://")[1], scheme="http")
    ids = {}
    for s in range(SHARDS):
        rows = [shapes.item_row(shapes.make_item(11, "test", s * ROWS + i)) for i in range(ROWS)]
        pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), f"{tmp_bucket}/in/s{s}.parquet",
                       filesystem=fs)
        ids[f"s{s}.parquet"] = [r["id"] for r in rows]
    return ids


def _args(bucket: str, proxy, lvlm: str, *extra: str) -> list[str]:
    return ["--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out", "--method", "random",
            "--prune-rate", "0.5", "--lvlm", lvlm, "--batch-size", "4", "--part-rows", "4",
            "--s3-endpoint", proxy.endpoint, *extra]


def _outage_once_parts_exist(s3_server, bucket: str, proxy, seconds: float) -> dict[str, float]:
    """A watcher thread: cut the store for ``seconds`` as soon as the first part is in the bucket (mid-run)."""
    seen: dict[str, float] = {}

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            keys = s3_server.keys(bucket, "out/")
            if any("/_parts/" in k and k.endswith(".parquet") for k in keys):
                seen["done_shards"] = sum("/_done/" in k and k.endswith(".json") for k in keys)
                seen["at"] = time.monotonic()
                proxy.outage(seconds)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def _check_output(s3_server, bucket: str, ids: dict[str, list[str]], prefix: str = "out") -> None:
    """Every input row exactly once, in input order, answered without an error; nothing left in _parts."""
    fs = pa.fs.S3FileSystem(endpoint_override=s3_server.endpoint.split("://")[1], scheme="http")
    for rel, want in ids.items():
        table = pq.read_table(f"{bucket}/{prefix}/{rel}", filesystem=fs)
        assert table.column("id").to_pylist() == want
        assert table.column("error").null_count == table.num_rows, table.column("error").to_pylist()
        assert table.column("prediction").null_count == 0
    keys = s3_server.keys(bucket, prefix + "/")
    assert not [k for k in keys if "/_parts/" in k and k.endswith(".parquet")]
    assert len([k for k in keys if "/_done/" in k and k.endswith(".json")]) == len(ids)


def test_a_20s_outage_mid_run_is_ridden_out(ray_session, s3_server, tmp_bucket, dataset, fault_proxy, lvlm) -> None:
    from pipeline.config import parse_args
    from pipeline.graph import run_job
    from tests.faults import SlowLVLMTier

    SlowLVLMTier.seconds_per_row = 0.1  # a run long enough to be cut in its middle
    seen = _outage_once_parts_exist(s3_server, tmp_bucket, fault_proxy, 20.0)
    summary = run_job(parse_args(_args(tmp_bucket, fault_proxy, lvlm)), lvlm=SlowLVLMTier)
    assert "at" in seen and seen["done_shards"] < SHARDS  # the outage came mid-run
    assert time.monotonic() >= seen["at"] + 20.0  # and the job outlived it
    assert summary["items"] == SHARDS * ROWS and summary["errors"] == 0
    assert sum(summary["retries"].values()) > 0, summary["retries"]
    assert fault_proxy.counts["connections_cut"] + fault_proxy.counts["connections_refused"] > 0
    _check_output(s3_server, tmp_bucket, dataset)


def test_a_20s_outage_mid_sweep_is_ridden_out(ray_session, s3_server, tmp_bucket, dataset, fault_proxy, lvlm,
                                              tmp_path) -> None:
    from tests.test_sweep import _sweep_module

    sweep = _sweep_module()
    seen = _outage_once_parts_exist(s3_server, tmp_bucket, fault_proxy, 20.0)
    args = ["--input", f"s3://{tmp_bucket}/in", "--output", f"s3://{tmp_bucket}/out", "--methods", "none,random",
            "--prune-rates", "0.5", "--lvlm", lvlm, "--batch-size", "4", "--part-rows", "4",
            "--s3-endpoint", fault_proxy.endpoint, "--model-cache", str(tmp_path / "cache")]
    assert sweep.main(args) == 0
    assert "at" in seen and time.monotonic() >= seen["at"] + 20.0
    for setting in ("none/0", "random/0.5"):
        _check_output(s3_server, tmp_bucket, dataset, prefix=f"out/{setting}")
        summary = json.loads(s3_server.client.get_object(Bucket=tmp_bucket, Key=f"out/{setting}/summary.json")
                             ["Body"].read())
        assert summary["items"] == SHARDS * ROWS and summary["errors"] == 0
        assert sum(summary["retries"].values()) > 0
    assert "out/summary.parquet" in s3_server.keys(tmp_bucket, "out/")  # the report went through too


def test_ten_percent_slowdown_for_a_whole_run(ray_session, s3_server, tmp_bucket, dataset, fault_proxy, lvlm) -> None:
    from pipeline.config import parse_args
    from pipeline.graph import run_job

    fault_proxy.set_error_rate(0.10)  # 503 SlowDown, from the first listing to the summary
    summary = run_job(parse_args(_args(tmp_bucket, fault_proxy, lvlm)))
    assert summary["items"] == SHARDS * ROWS and summary["errors"] == 0
    injected = fault_proxy.counts["errors_injected"]
    assert injected > 10
    retries = summary["retries"]
    assert {"write", "read part"} & set(retries) or sum(retries.values()) >= injected // 4, retries
    _check_output(s3_server, tmp_bucket, dataset)


def test_an_outage_past_the_budget_exits_3_and_resume_finishes(ray_session, s3_server, tmp_bucket, dataset,
                                                              fault_proxy, lvlm) -> None:
    from pipeline.config import parse_args
    from pipeline.exits import EXIT_STORE_UNAVAILABLE, failure
    from pipeline.graph import run_job
    from tests.faults import SlowLVLMTier

    SlowLVLMTier.seconds_per_row = 0.1
    seen = _outage_once_parts_exist(s3_server, tmp_bucket, fault_proxy, 600.0)
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever Ray wraps it in, failure() finds it
        run_job(parse_args(_args(tmp_bucket, fault_proxy, lvlm, "--retry-budget-s", "4")), lvlm=SlowLVLMTier)
    assert "at" in seen and time.monotonic() - t0 < 120
    code, line = failure(info.value)
    assert code == EXIT_STORE_UNAVAILABLE
    assert "\n" not in line and f"s3://{tmp_bucket}/out" in line and "--resume" in line, line
    fault_proxy.heal()
    summary = run_job(parse_args(_args(tmp_bucket, fault_proxy, lvlm, "--resume")))
    assert summary["items"] == SHARDS * ROWS and summary["errors"] == 0
    assert summary["rows_processed"] < SHARDS * ROWS  # what was durable before the outage was kept
    _check_output(s3_server, tmp_bucket, dataset)


def test_resume_redoes_the_rows_of_an_empty_or_truncated_part(ray_session, s3_server, tmp_bucket, dataset,
                                                               lvlm) -> None:
    """A write interrupted between opening its upload and writing to it leaves a 0-byte object under the part's
    name (pyarrow's S3 stream commits what it holds when it is closed). The state of a crash before shard s0
    was finalized, rebuilt from a finished run: one good part (rows 0-3), one empty (4-7), one truncated
    (8-11). ``--resume`` keeps the good part, drops the other two with a warning and redoes their rows."""
    from pipeline import resume
    from pipeline.config import parse_args
    from pipeline.graph import run_job
    from pipeline.progress import part_url
    from pipeline.schema import OUTPUT_COLUMNS

    run_job(parse_args(_args(tmp_bucket, s3_server, lvlm)))
    fs = pa.fs.S3FileSystem(endpoint_override=s3_server.endpoint.split("://")[1], scheme="http")
    output, rel = f"s3://{tmp_bucket}/out", "s0.parquet"
    done = pq.read_table(f"{tmp_bucket}/out/{rel}", filesystem=fs)
    done = done.select(["id", *(c for c in OUTPUT_COLUMNS if c in done.column_names)])

    def part_bytes(rows: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink)
        return sink.getvalue().to_pybytes()

    def put(url: str, body: bytes) -> None:
        s3_server.client.put_object(Bucket=tmp_bucket, Key=url.split(f"{tmp_bucket}/", 1)[1], Body=body)

    ids = done.column("id").to_pylist()
    put(part_url(output, rel, ids[0:4]), part_bytes(done.slice(0, 4)))
    put(part_url(output, rel, ids[4:8]), b"")
    truncated = part_bytes(done.slice(8, 4))
    put(part_url(output, rel, ids[8:12]), truncated[: len(truncated) // 2])
    for url in (resume.marker_url(output, rel), resume.output_url(output, rel)):
        s3_server.client.delete_object(Bucket=tmp_bucket, Key=url.split(f"{tmp_bucket}/", 1)[1])

    summary = run_job(parse_args(_args(tmp_bucket, s3_server, lvlm, "--resume")))
    assert summary["rows_processed"] == ROWS - 4  # the good part's rows were kept, the others redone
    assert summary["items"] == SHARDS * ROWS and summary["errors"] == 0
    _check_output(s3_server, tmp_bucket, dataset)


def test_permanent_faults_fail_in_seconds_writing_nothing(ray_session, s3_server, tmp_bucket, dataset, fault_proxy,
                                                          lvlm) -> None:
    from pipeline.config import parse_args
    from pipeline.exits import EXIT_REJECTED, failure
    from pipeline.graph import run_job

    before = sorted(s3_server.keys(tmp_bucket))
    fault_proxy.set_error_rate(1.0, 403, "AccessDenied", methods=("PUT", "POST", "DELETE"))  # reads allowed
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        run_job(parse_args(_args(tmp_bucket, fault_proxy, lvlm)))
    assert time.monotonic() - t0 < 30
    code, line = failure(info.value)
    assert code == EXIT_REJECTED and "AccessDenied" in line.replace("ACCESS_DENIED", "AccessDenied"), line
    assert f"s3://{tmp_bucket}/out" in line
    fault_proxy.heal()
    assert sorted(s3_server.keys(tmp_bucket)) == before  # nothing half-written

    args = _args(tmp_bucket, fault_proxy, lvlm)
    args[args.index("--output") + 1] = "s3://no-such-bucket-for-output/out"
    t0 = time.monotonic()
    with pytest.raises(OSError) as info:
        run_job(parse_args(args))
    assert time.monotonic() - t0 < 30
    code, line = failure(info.value)
    assert code == EXIT_REJECTED and "no-such-bucket-for-output" in line, line
    assert sorted(s3_server.keys(tmp_bucket)) == before
