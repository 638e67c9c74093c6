"""Object-store faults ridden out or refused, one storage call at a time: the real moto S3 server behind
``tests/faultproxy.py`` (connection resets, refused connections, 503 SlowDown, 403), through the same
``pipeline.storage`` helpers the job uses. The whole-job fault runs are in ``test_job_faults.py``."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from pipeline import retry, storage


@pytest.fixture(autouse=True)
def short_budget():
    before = retry.budget()
    retry.take_retry_counts()
    retry.set_budget(30.0)
    yield
    retry.set_budget(before)
    retry.take_retry_counts()


def test_classification_is_one_table() -> None:
    transient = [
        ConnectionResetError("Connection reset by peer"),
        TimeoutError("timed out"),
        OSError("When reading information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                "HeadObject operation: curlCode: 56, Failure when receiving data from the peer"),
        OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."),
        OSError("AWS Error SLOW_DOWN during ListObjectsV2 operation: Please reduce your request rate."),
        OSError("AWS Error INTERNAL_FAILURE during PutObject operation: We encountered an internal error."),
    ]
    permanent = [
        FileNotFoundError("Path does not exist 'bucket/x'"),
        PermissionError("Forbidden"),
        OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."),
        OSError("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload operation: The specified bucket does "
                "not exist"),
        OSError("AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation (HTTP status 403)"),
        ValueError("s3 URL without a bucket"),
        RuntimeError("something we do not know"),  # unknown: fail at once rather than wait a budget out
    ]
    assert all(retry.is_transient(e) for e in transient), [e for e in transient if not retry.is_transient(e)]
    assert not any(retry.is_transient(e) for e in permanent), [e for e in permanent if retry.is_transient(e)]
    try:  # a translated error is judged by the one it was raised from (s3fs's habit)
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            raise OSError("Service Unavailable") from None
    except OSError as wrapped:
        assert retry.is_transient(wrapped)


def test_budget_error_pickles_and_reads_as_one_line() -> None:
    exc = retry.RetryBudgetExceeded("write s3://b/k failed for 3 s; rerun with --resume", op="write", url="s3://b/k")
    back = pickle.loads(pickle.dumps(exc))
    assert isinstance(back, retry.RetryBudgetExceeded) and isinstance(back, storage.StorageError)
    assert (str(back), back.op, back.url) == (str(exc), "write", "s3://b/k")


def test_backoff_retries_until_the_store_answers() -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 5:
            raise ConnectionResetError("Connection reset by peer")
        return "ok"

    assert retry.retry_call("read", "s3://b/k", flaky) == "ok"
    assert retry.take_retry_counts() == {"read": 4}
    waits = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert all(w <= retry.BASE_DELAY_S * 2 ** i + 0.05 for i, w in enumerate(waits))  # capped exponential


def test_an_outage_is_ridden_out_on_read_write_and_list(s3_server, tmp_bucket, fault_proxy) -> None:
    opts = {"s3_endpoint": fault_proxy.endpoint}
    url = f"s3://{tmp_bucket}/dir/a.bin"
    storage.write_bytes(url, b"before", **opts)
    fault_proxy.outage(2.0)
    storage.write_bytes(url, b"after", **opts)  # cut, then refused for 2 s, then through
    assert storage.read_bytes(url, **opts) == b"after"
    fault_proxy.outage(2.0)
    assert storage.list_files(f"s3://{tmp_bucket}/dir", **opts) == [url]
    counts = retry.take_retry_counts()
    assert counts.get("write", 0) >= 1 and counts.get("list", 0) >= 1, counts
    assert fault_proxy.counts["connections_refused"] + fault_proxy.counts["connections_cut"] > 0


def test_slowdown_503s_are_retried_and_never_duplicate(s3_server, tmp_bucket, fault_proxy) -> None:
    opts = {"s3_endpoint": fault_proxy.endpoint}
    fault_proxy.set_error_rate(0.3)  # 503 SlowDown on 30% of the requests
    for i in range(12):
        storage.write_bytes(f"s3://{tmp_bucket}/p/{i}", str(i).encode(), **opts)
    assert [storage.read_bytes(f"s3://{tmp_bucket}/p/{i}", **opts) for i in range(12)] == \
        [str(i).encode() for i in range(12)]
    fault_proxy.heal()
    assert fault_proxy.counts["errors_injected"] > 0
    assert sum(retry.take_retry_counts().values()) > 0
    assert sorted(s3_server.keys(tmp_bucket, "p/")) == sorted(f"p/{i}" for i in range(12))  # each object once


def test_an_outage_past_the_budget_ends_in_one_line_naming_the_object(s3_server, tmp_bucket, fault_proxy) -> None:
    retry.set_budget(1.5)
    fault_proxy.outage(30.0)
    t0 = time.monotonic()
    with pytest.raises(retry.RetryBudgetExceeded) as info:
        storage.write_bytes(f"s3://{tmp_bucket}/out/x.parquet", b"x", s3_endpoint=fault_proxy.endpoint)
    assert time.monotonic() - t0 < 1.5 + 2 * storage.CONNECT_TIMEOUT_S
    message = str(info.value)
    assert "\n" not in message and f"s3://{tmp_bucket}/out/x.parquet" in message and "--resume" in message
    fault_proxy.heal()


@pytest.mark.parametrize("status,code", [(403, "AccessDenied"), (403, "InvalidAccessKeyId"),
                                         (403, "SignatureDoesNotMatch")])
def test_denied_credentials_fail_at_once_redacted(s3_server, tmp_bucket, fault_proxy, status, code) -> None:
    secret = "wJalrXUtnFEMI-very-secret-key-0001"
    fault_proxy.set_error_rate(1.0, status, code)
    opts = {"s3_endpoint": fault_proxy.endpoint, "access_key": "AKIAABCDEFGHIJKLMNOP", "secret_key": secret}
    for op in (lambda: storage.write_bytes(f"s3://{tmp_bucket}/x", b"x", **opts),
               lambda: storage.list_files(f"s3://{tmp_bucket}/", **opts)):
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            op()
        assert time.monotonic() - t0 < 5.0  # no budget of waiting for an answer that will not change
        assert not isinstance(info.value, retry.RetryBudgetExceeded)
        assert secret not in str(info.value) and "AKIAABCDEFGHIJKLMNOP" not in str(info.value)
        assert tmp_bucket in str(info.value)
    assert retry.take_retry_counts() == {}
    assert s3_server.keys(tmp_bucket) == []


def test_a_missing_bucket_fails_at_once_and_says_so(s3_server, fault_proxy) -> None:
    opts = {"s3_endpoint": fault_proxy.endpoint}
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here.*(NoSuchBucket|not exist)"):
        storage.read_bytes("s3://no-such-bucket-here/x", **opts)
    with pytest.raises(OSError, match="no-such-bucket-here"):
        storage.write_bytes("s3://no-such-bucket-here/x", b"x", **opts)
    assert time.monotonic() - t0 < 5.0 and retry.take_retry_counts() == {}


def test_counts_are_per_process_and_thread_safe() -> None:
    def failing_twice(state: list[int]) -> None:
        state.append(1)
        if len(state) <= 2:
            raise TimeoutError("timed out")

    threads = [threading.Thread(target=retry.retry_call, args=("stat", "s3://b/k", failing_twice, []))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert retry.take_retry_counts() == {"stat": 16}
    assert retry.take_retry_counts() == {}


def test_the_filesystem_ray_data_reads_with_retries_every_call(s3_server, tmp_bucket, fault_proxy) -> None:
    """pipeline.retrying_fs: listing, footer and column reads of a Parquet file through 30% SlowDown answers
    and an outage, byte for byte the file; it pickles (Ray ships it to read tasks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.retrying_fs import retrying

    table = pa.table({"id": [f"r{i}" for i in range(5000)], "x": list(range(5000))})
    raw, _ = storage.resolve(f"s3://{tmp_bucket}/t.parquet", s3_endpoint=s3_server.endpoint)
    pq.write_table(table, f"{tmp_bucket}/t.parquet", filesystem=raw, row_group_size=500)
    fs, path = storage.resolve(f"s3://{tmp_bucket}/t.parquet", s3_endpoint=fault_proxy.endpoint)
    wrapped = pickle.loads(pickle.dumps(retrying(fs)))
    fault_proxy.set_error_rate(0.3)
    assert pq.read_schema(path, filesystem=wrapped).names == ["id", "x"]
    assert pq.read_table(path, filesystem=wrapped).equals(table)
    fault_proxy.heal()
    fault_proxy.outage(1.5)
    assert pq.read_table(path, filesystem=wrapped, columns=["x"]).column("x").to_pylist() == list(range(5000))
    counts = retry.take_retry_counts()
    assert counts.get("read", 0) + counts.get("stat", 0) > 0, counts
