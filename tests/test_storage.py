"""pipeline.storage against the local filesystem and a real S3 HTTP server (moto server mode)."""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import S3Config, StorageError, redact, resolve

from .conftest import DUMMY_SECRET_KEY


def test_resolve_local_forms(tmp_path, monkeypatch):
    fs, path = resolve(str(tmp_path / "a.parquet"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.parquet")
    fs, path = resolve(f"file://{tmp_path}/b")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/b"
    monkeypatch.chdir(tmp_path)
    assert resolve("rel/c.parquet")[1] == str(tmp_path / "rel" / "c.parquet")


def test_resolve_s3_path_and_bad_urls():
    fs, path = resolve("s3://bucket/some/prefix/", s3_endpoint="http://127.0.0.1:9")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"
    assert resolve("s3://bucket", s3_endpoint="http://127.0.0.1:9")[1] == "bucket"
    with pytest.raises(ValueError, match="unsupported storage URL scheme"):
        resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="without a bucket"):
        resolve("s3:///x")
    with pytest.raises(TypeError, match="'secret'"):
        resolve("s3://bucket/x", secret="hunter2-value")


def test_local_bytes_roundtrip_and_listing(tmp_path):
    root = tmp_path / "data"
    storage.write_bytes(str(root / "deep" / "x.bin"), b"\x00payload")
    assert storage.read_bytes(f"file://{root}/deep/x.bin") == b"\x00payload"
    assert storage.exists(str(root / "deep")) and not storage.exists(str(root / "missing"))
    table = pa.table({"id": ["a"]})
    for name in ("b.parquet", "a.parquet", "sub/c.parquet", "_SUCCESS", ".tmp.parquet", "_staging/d.parquet"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / name)
    (root / "notes.txt").write_text("x")
    assert storage.list_parquet_files(str(root)) == [
        str(root / "a.parquet"),
        str(root / "b.parquet"),
        str(root / "sub" / "c.parquet"),
    ]
    assert storage.list_parquet_files(str(root / "a.parquet")) == [str(root / "a.parquet")]
    with pytest.raises(FileNotFoundError):
        storage.list_parquet_files(str(root / "nope"))


def test_s3_roundtrip_via_env(s3_server, tmp_bucket):
    url = f"s3://{tmp_bucket}/dir/blob.bin"
    assert not storage.exists(url)
    storage.write_bytes(url, b"hello s3")
    assert storage.exists(url) and storage.exists(f"s3://{tmp_bucket}/dir")
    assert storage.read_bytes(url) == b"hello s3"
    assert s3_server.keys(tmp_bucket) == ["dir/blob.bin"]


def test_s3_parquet_and_listing(s3_server, tmp_bucket):
    table = pa.table({"id": ["a", "b"], "question": ["q1", "q2"]})
    for key in ("ds/part-1.parquet", "ds/part-0.parquet", "ds/sub/part-2.parquet", "ds/_SUCCESS"):
        fs, path = resolve(f"s3://{tmp_bucket}/{key}")
        pq.write_table(table, path, filesystem=fs)
    files = storage.list_parquet_files(f"s3://{tmp_bucket}/ds/")
    assert files == [f"s3://{tmp_bucket}/ds/part-0.parquet", f"s3://{tmp_bucket}/ds/part-1.parquet",
                     f"s3://{tmp_bucket}/ds/sub/part-2.parquet"]
    fs, path = resolve(files[0])
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_s3_explicit_options_without_env(s3_server, tmp_bucket, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    options = dict(s3_endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                   secret_key=s3_server.secret_key)
    storage.write_bytes(f"s3://{tmp_bucket}/k", b"v", **options)
    assert storage.read_bytes(f"s3://{tmp_bucket}/k", **options) == b"v"
    fs, path = storage.fsspec_filesystem(f"s3://{tmp_bucket}/k", **options)
    assert fs.cat(path) == b"v"


def test_fsspec_filesystem(s3_server, tmp_bucket, tmp_path):
    storage.write_bytes(f"s3://{tmp_bucket}/p/one.txt", b"1")
    fs, path = storage.fsspec_filesystem(f"s3://{tmp_bucket}/p")
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path)] == ["one.txt"]
    lfs, lpath = storage.fsspec_filesystem(f"file://{tmp_path}")
    assert lfs.isdir(lpath)


def test_download_dir_copies_once(s3_server, tmp_bucket, tmp_path):
    files = {"config.json": b"{}", "model.safetensors": os.urandom(3000), "tokenizer/vocab.json": b"[]"}
    for rel, data in files.items():
        storage.write_bytes(f"s3://{tmp_bucket}/models/tiny/{rel}", data)
    cache = tmp_path / "cache"
    local = storage.download_dir(f"s3://{tmp_bucket}/models/tiny", cache)
    for rel, data in files.items():
        assert (cache / local / rel).read_bytes() == data
    # second call reuses the cache: it must not need the bucket any more
    s3_server.client.delete_object(Bucket=tmp_bucket, Key="models/tiny/config.json")
    assert storage.download_dir(f"s3://{tmp_bucket}/models/tiny/", cache) == local
    assert not [p for p in os.listdir(cache) if p.startswith(".staging")]
    # local directories are used in place
    assert storage.download_dir(str(tmp_path), cache) == str(tmp_path)
    with pytest.raises(FileNotFoundError):
        storage.download_dir(f"s3://{tmp_bucket}/models/absent", cache)


def test_errors_are_redacted(s3_server, monkeypatch):
    secret = "Sup3rSecretValue/xyz+123"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises((StorageError, FileNotFoundError)) as info:
        storage.read_bytes("s3://no-such-bucket-here/x", secret_key=secret, access_key="AKIAIOSFODNN7EXAMPLE")
    text = str(info.value) + repr(info.value)
    assert secret not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    # an endpoint nobody listens on: transient (retried until the budget is spent), still without the secret
    from pipeline import retry

    before = retry.budget()
    retry.set_budget(1.0)
    try:
        with pytest.raises(retry.RetryBudgetExceeded) as info:
            storage.read_bytes("s3://b/x", s3_endpoint="http://127.0.0.1:1", secret_key=secret, access_key="k1234")
    finally:
        retry.set_budget(before)
        retry.take_retry_counts()
    assert secret not in str(info.value) and info.value.__context__ is None
    assert "s3://b/x" in str(info.value) and "--resume" in str(info.value)


def test_config_repr_hides_secrets():
    config = S3Config.from_options(s3_endpoint="http://h:1", access_key="id-1", secret_key="s-9876",
                                   session_token="t-5555")
    assert config.secret_key == "s-9876"
    assert "s-9876" not in repr(config) and "t-5555" not in repr(config)
    assert "http://h:1" in repr(config)


def test_redact_patterns(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET_KEY)
    assert redact(f"failed with {DUMMY_SECRET_KEY}!") == "failed with ***!"
    assert redact("s3://user:pass@bucket/key") == "s3://***@bucket/key"
    assert redact("https://x/?X-Amz-Signature=abcd&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F") == (
        "https://x/?X-Amz-Signature=***&X-Amz-Credential=***"
    )
    assert redact("{'secret_key': 'v4lue', 'aws_session_token': 'tok'}") == (
        "{'secret_key': '***', 'aws_session_token': '***'}"
    )
    assert redact("key AKIAIOSFODNN7EXAMPLE used") == "key *** used"
    assert redact("plain", secrets=("plain",)) == "***"
    # ordinary key=value text is left alone
    assert redact("keep_tokens=8 max_new_tokens=4 method=accm") == "keep_tokens=8 max_new_tokens=4 method=accm"


def test_redacting_log_filter(caplog):
    logger = logging.getLogger("test.storage.redact")
    logger.addFilter(storage.RedactingFilter())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("connecting with secret_key=%s to %s", "abc-123-secret", "s3://u:p@b/k")
    assert "abc-123-secret" not in caplog.text and "u:p@" not in caplog.text
    assert "secret_key=***" in caplog.text
