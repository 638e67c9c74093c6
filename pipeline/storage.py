"""One way from a URL to bytes: plain paths, ``file://`` and ``s3://`` (AWS or any S3-compatible store).

``resolve(url)`` gives a pyarrow filesystem and the path inside it (what ``pyarrow.parquet`` and
``ray.data`` take); ``fsspec_filesystem(url)`` gives the fsspec/s3fs equivalent for libraries that want
one. The S3 endpoint, region and credentials come from explicit options first, then from the standard
AWS environment variables (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``), then from
the SDK's own chain (profiles, instance roles).

Secrets never leave this module in text: ``S3Config``'s repr hides them, every error raised here goes
through ``redact()``, and ``RedactingFilter`` scrubs log records of the job's loggers.

Every operation here runs through ``call()``: transient faults are retried by ``pipeline.retry`` (the one
place that classifies them) and whatever still fails leaves through the redaction gate. The clients' own
retries are off (one attempt) so that every retry is ours: budgeted, logged and counted in the summary;
their timeouts are short enough that a stalled connection becomes a (transient) error instead of a hang.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_OPTION_NAMES = ("access_key", "secret_key", "session_token", "region", "anonymous")
_known_secrets: set[str] = set()  # explicit secrets seen by this process, scrubbed by redact()


class StorageError(OSError):
    """A storage operation failed; the message is already redacted."""


# ----------------------------------------------------------------------------------------------------
# redaction

_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
# key=value / key: value pairs whose key *ends* in a secret word (keep_tokens=8 is not a secret)
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>[\w-]*?(?:secret(?:[_-]?(?:access[_-]?)?key)?|token|password|passwd|signature|credentials?|(?:access|api)[_-]?key(?:[_-]id)?))"
    r"(?![\w-])(?P<sep>['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s&'\",;)}]+)"
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def redact(text: object, secrets: tuple[str, ...] = ()) -> str:
    """``text`` as a string with credentials replaced by ``***``.

    Scrubs the given ``secrets``, secrets passed to this module as options, the AWS credential
    environment variables, ``user:password@`` in URLs, ``secret=...``/``token: ...`` style pairs and
    AWS access key ids.
    """
    out = str(text)
    values = {*secrets, *_known_secrets, *(os.environ.get(k, "") for k in _SECRET_ENV)}
    for value in sorted((v for v in values if v and len(v) >= 4), key=len, reverse=True):
        out = out.replace(value, "***")
    out = _URL_USERINFO.sub(r"\g<scheme>***@", out)
    out = _SECRET_PARAM.sub(r"\g<key>\g<sep>***", out)
    return _AWS_KEY_ID.sub("***", out)


class RedactingFilter(logging.Filter):
    """Logging filter that renders each record and passes it through ``redact()``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


class _NoSuchBucket(FileNotFoundError):
    """A read found no bucket (pyarrow only says "Path does not exist" for a bodiless 404)."""


def _guarded(action: str, url: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)``; re-raise a failure with a redacted message and without the original error.

    The new error is raised after the ``except`` block has ended, so the unredacted original is not
    even kept as ``__context__`` (tracebacks, Ray's error reports and debuggers never see it).
    """
    try:
        return fn(*args, **kwargs)
    except StorageError:
        raise
    except FileNotFoundError as exc:
        detail = f" (NoSuchBucket: {exc})" if isinstance(exc, _NoSuchBucket) else ""
        error: OSError = FileNotFoundError(redact(f"{action} {url}: not found{detail}"))
    except Exception as exc:  # noqa: BLE001 - every backend error passes the redaction gate
        error = StorageError(redact(f"{action} {url}: {type(exc).__name__}: {exc}"))
    raise error


def call(action: str, url: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with transient faults retried (``pipeline.retry``) and errors redacted.

    For wrapping pyarrow calls elsewhere, e.g. ``call("read schema", url, pq.read_schema, path,
    filesystem=fs)``; ``action`` and ``url`` name the operation in logs, retry counts and errors.
    """
    from pipeline import retry  # retry imports this module

    return _guarded(action, url, retry.retry_call, action, url, fn, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# configuration

# The clients do not retry and time out early: ``pipeline.retry`` owns every retry (budget, log, count).
CLIENT_MAX_ATTEMPTS = 1
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0  # pyarrow on Linux: abort when under 1 byte/s for this long (curl's low-speed limit)


@dataclass(frozen=True)
class S3Config:
    """Resolved S3 connection settings; secret fields are kept out of the repr."""

    endpoint: str | None = None  # full URL, e.g. http://127.0.0.1:9000; None = AWS default
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anonymous: bool = False

    @classmethod
    def from_options(cls, s3_endpoint: str | None = None, **options: Any) -> S3Config:
        unknown = [k for k in options if k not in _OPTION_NAMES]
        if unknown:  # name the option, never echo its value
            raise TypeError(f"unknown storage option {unknown[0]!r}; known: {', '.join(_OPTION_NAMES)}")
        env = os.environ
        endpoint = s3_endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint
        config = cls(
            endpoint=endpoint,
            region=options.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key=options.get("access_key") or env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=options.get("secret_key") or env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=options.get("session_token") or env.get("AWS_SESSION_TOKEN") or None,
            anonymous=bool(options.get("anonymous", False)),
        )
        for secret in (options.get("secret_key"), options.get("session_token"), options.get("access_key")):
            if secret:
                _known_secrets.add(secret)
        return config

    def pyarrow(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=CLIENT_MAX_ATTEMPTS),
            "connect_timeout": CONNECT_TIMEOUT_S,
            "request_timeout": REQUEST_TIMEOUT_S,
        }
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            kwargs["scheme"] = parsed.scheme or "https"
        if self.region:
            kwargs["region"] = self.region
        if self.anonymous:
            kwargs["anonymous"] = True
        elif self.access_key and self.secret_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key)
            if self.session_token:
                kwargs["session_token"] = self.session_token
        return pafs.S3FileSystem(**kwargs)

    def s3fs(self):  # -> s3fs.S3FileSystem (imported lazily: s3fs pulls aiobotocore)
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if self.endpoint:
            client_kwargs["endpoint_url"] = self.endpoint
        if self.region:
            client_kwargs["region_name"] = self.region
        config_kwargs = {"retries": {"total_max_attempts": CLIENT_MAX_ATTEMPTS, "mode": "standard"},
                         "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": REQUEST_TIMEOUT_S}
        kwargs: dict[str, Any] = {"client_kwargs": client_kwargs, "config_kwargs": config_kwargs}
        if self.anonymous:
            kwargs["anon"] = True
        elif self.access_key and self.secret_key:
            kwargs.update(key=self.access_key, secret=self.secret_key, token=self.session_token)
        return s3fs.S3FileSystem(**kwargs)


def _split(url: str) -> tuple[str, str]:
    """(scheme, path) with scheme in {"local", "s3"}; local paths come back absolute."""
    if not url:
        raise ValueError("empty storage URL")
    if url.startswith(("s3://", "s3a://")):
        parsed = urlparse(url)
        if parsed.username or parsed.password:
            raise ValueError(redact(f"credentials inside the URL are not supported: {url}"))
        if not parsed.netloc:
            raise ValueError(f"s3 URL without a bucket: {url}")
        return "s3", (parsed.netloc + parsed.path).rstrip("/") or parsed.netloc
    if url.startswith("file://"):
        path = urlparse(url).path
        return "local", os.path.abspath(path)
    if "://" in url:
        raise ValueError(redact(f"unsupported storage URL scheme: {url} (use a path, file:// or s3://)"))
    return "local", os.path.abspath(os.path.expanduser(url))


def _join(url: str, relative: str) -> str:
    return url.rstrip("/") + "/" + relative.lstrip("/")


def resolve(url: str, *, s3_endpoint: str | None = None, **options: Any) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a plain path, ``file://`` or ``s3://`` URL."""
    scheme, path = _split(url)
    if scheme == "local":
        return pafs.LocalFileSystem(), path
    config = S3Config.from_options(s3_endpoint, **options)
    return _guarded("connect", url, config.pyarrow), path


def fsspec_filesystem(url: str, *, s3_endpoint: str | None = None, **options: Any) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it): s3fs for ``s3://``, the local filesystem otherwise."""
    scheme, path = _split(url)
    if scheme == "local":
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), path
    config = S3Config.from_options(s3_endpoint, **options)
    return _guarded("connect", url, config.s3fs), path


# ----------------------------------------------------------------------------------------------------
# helpers: every one goes through call(), so retried and redacted alike


def exists(url: str, **options: Any) -> bool:
    """Whether a file or directory (for S3: any object under the prefix) exists at ``url``."""
    fs, path = resolve(url, **options)
    return call("stat", url, fs.get_file_info, path).type != pafs.FileType.NotFound


def _missing_bucket(fs: pafs.FileSystem, path: str) -> str | None:
    """The bucket of ``path`` when it does not exist (asked only once a read found nothing), else None."""
    if not isinstance(fs, pafs.S3FileSystem):
        return None
    bucket = path.split("/", 1)[0]
    try:
        return bucket if fs.get_file_info(bucket).type == pafs.FileType.NotFound else None
    except OSError:
        return None


def read_bytes(url: str, *, action: str = "read", **options: Any) -> bytes:
    """The whole object at ``url``. A missing bucket is named as such: pyarrow only says "not found".
    ``action`` names the operation in logs, retry counts and errors (``call``)."""
    fs, path = resolve(url, **options)

    def read() -> bytes:
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            if (bucket := _missing_bucket(fs, path)) is not None:
                raise _NoSuchBucket(f"bucket {bucket!r} does not exist") from None
            raise

    return call(action, url, read)


def write_bytes(url: str, data: bytes, **options: Any) -> None:
    """Write ``data`` to ``url``, creating local parent directories (a retry rewrites the whole object)."""
    fs, path = resolve(url, **options)

    def write() -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)

    call("write", url, write)


def _list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def list_parquet_files(url: str, **options: Any) -> list[str]:
    """Sorted URLs of the ``*.parquet`` files under ``url`` (recursive), or ``[url]`` for one file."""
    return list_data_files(url, (".parquet",), **options)


def list_data_files(url: str, suffixes: tuple[str, ...], **options: Any) -> list[str]:
    """Sorted URLs of the files under ``url`` (recursive) whose names end in one of ``suffixes``, or ``[url]``
    for one file.

    Names starting with ``_`` or ``.`` (``_SUCCESS``, ``.crc``, hidden staging files) are skipped.
    Returned URLs keep the input's scheme, so they can be handed back to ``resolve``.
    """
    scheme, _ = _split(url)
    fs, path = resolve(url, **options)
    infos = call("list", url, _list_files, fs, path)
    out = []
    for info in infos:
        relative = info.path[len(path):].lstrip("/")
        if info.path == path:
            return [url]
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        if info.base_name.endswith(suffixes):
            out.append(("s3://" + info.path) if scheme == "s3" else info.path)
    return out


def list_files(url: str, **options: Any) -> list[str]:
    """Sorted URLs of every file under ``url`` (recursive, ``_``/``.`` names included), ``[url]`` for one
    file, ``[]`` when nothing is there. URLs keep the scheme (``s3://``, ``file://`` or a plain path)."""
    scheme, _ = _split(url)
    fs, path = resolve(url, **options)

    def listing() -> list[pafs.FileInfo]:
        try:
            return _list_files(fs, path)
        except FileNotFoundError:
            return []

    prefix = "s3://" if scheme == "s3" else "file://" if url.startswith("file://") else ""
    return [prefix + info.path for info in call("list", url, listing)]


def delete(url: str, **options: Any) -> None:
    """Delete the file at ``url``; a missing one is fine (a retried delete may find its work done).

    On S3, pyarrow then keeps the parent "directory" with an empty ``parent/`` marker object."""
    fs, path = resolve(url, **options)

    def remove() -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    call("delete", url, remove)


def delete_prefix(url: str, **options: Any) -> None:
    """Delete everything under ``url`` (a directory or S3 prefix; also a single file); nothing there is fine.

    An S3 bucket root is emptied, never deleted."""
    fs, path = resolve(url, **options)

    def remove() -> None:
        kind = fs.get_file_info(path).type
        try:
            if kind == pafs.FileType.File:
                fs.delete_file(path)
            elif kind == pafs.FileType.Directory and isinstance(fs, pafs.S3FileSystem) and "/" not in path:
                fs.delete_dir_contents(path, missing_dir_ok=True)
            elif kind == pafs.FileType.Directory:
                fs.delete_dir(path)
        except FileNotFoundError:  # gone meanwhile, e.g. deleted by an attempt that seemed to fail
            pass

    call("delete", url, remove)


def _cache_name(url: str) -> str:
    scheme, path = _split(url)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{scheme}_{path}").strip("_")


def download_dir(url: str, local_cache: str | os.PathLike[str], **options: Any) -> str:
    """A local directory holding the contents of ``url`` (e.g. a model directory on S3).

    Local URLs are returned as they are. S3 prefixes are copied once into ``local_cache`` (a staging
    directory renamed into place, so concurrent workers never see a half-copied model) and reused.
    """
    scheme, path = _split(url)
    if scheme == "local":
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory not found: {path}")
        return path
    target = Path(local_cache) / _cache_name(url)
    if (target / ".complete").exists():
        return str(target)
    fs, path = resolve(url, **options)
    staging = Path(local_cache) / f".staging-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)

    def copy_one(src: str, dest: Path) -> None:  # a retry starts the file over
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(src) as f, open(dest, "wb") as out:
            shutil.copyfileobj(f, out, length=1 << 20)

    try:
        infos = call("list", url, _list_files, fs, path)
        if not infos:
            raise FileNotFoundError(redact(f"download {url}: not found (no files)"))
        for info in infos:
            relative = info.path[len(path):].lstrip("/") or info.base_name
            call("download", "s3://" + info.path, copy_one, info.path, staging / relative)
        n_files = len(infos)
        (staging / ".complete").touch()
        try:
            staging.rename(target)
        except OSError:  # another worker finished first: keep theirs
            if not (target / ".complete").exists():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
        log.info("downloaded %s (%d files) to %s", redact(url), n_files, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
