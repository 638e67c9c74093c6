"""Retries for object-store calls: the ONE place that decides which failures are transient.

A transient fault (connection refused/reset, timeouts, 5xx, SlowDown/throttling) is retried with
exponential backoff and full jitter until a process-wide budget, measured from the first failure, is
spent; then ``RetryBudgetExceeded`` says the store may be down and the job can be rerun with
``--resume``. Everything else (missing object or bucket, denied or bad credentials, bad URLs,
unknown errors) fails at once: retrying cannot fix it and would only hide it.

The error texts matched below were observed against moto behind ``tests/faultproxy.py`` (pyarrow 26
with its bundled AWS SDK, botocore 1.44, s3fs 0.4.2), e.g. from pyarrow:

* outage (reset):   ``When reading information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION
  during HeadObject operation: curlCode: 56, Failure when receiving data from the peer; Details: Recv
  failure: Connection reset by peer``
* refused:          ``AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not
  connect to server; Details: Failed to connect to 127.0.0.1:1 after 0 ms: Could not connect to server``
* stalled:          ``AWS Error NETWORK_CONNECTION ... curlCode: 28, Timeout was reached; Details:
  Operation too slow. Less than 1 bytes/sec transferred the last 5 seconds``
* 503 on HEAD:      ``AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.``
  (likewise ``(HTTP status 500)``, ``502``, ``504``: HEAD answers carry no XML)
* 503 with XML:     ``AWS Error SLOW_DOWN during ListObjectsV2 operation: Please reduce your request
  rate.``, ``AWS Error SERVICE_UNAVAILABLE during CreateMultipartUpload operation: ...``
* 500 with XML:     ``AWS Error INTERNAL_FAILURE during ListObjectsV2 operation: We encountered an
  internal error. Please try again.``
* 403:              ``AWS Error ACCESS_DENIED during HeadObject operation: No response body.``,
  ``AWS Error SIGNATURE_DOES_NOT_MATCH during ListObjectsV2 ...``, ``AWS Error INVALID_ACCESS_KEY_ID ...``
* no such bucket:   reads raise ``FileNotFoundError: Path does not exist 'nope/x'`` (a bodiless 404 HEAD);
  writes/lists ``AWS Error NO_SUCH_BUCKET during CreateMultipartUpload operation: The specified bucket
  does not exist``.

boto3: ``ClientError: An error occurred (SlowDown) when calling the GetObject operation (reached max
retries: 2): ...``, ``(503) when calling the HeadObject operation``, ``EndpointConnectionError: Could
not connect to the endpoint URL``, ``ConnectionClosedError``, ``ReadTimeoutError``. s3fs 0.4.2 turns
ClientErrors into ``OSError(EBUSY, 'Service Unavailable')``, ``OSError(EREMOTEIO, 'Internal Server
Error')``, ``PermissionError('Forbidden')``, ``FileNotFoundError``, raised while handling the
ClientError (so the original is the ``__context__``).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.storage import StorageError, redact

log = logging.getLogger("accm.retry")
T = TypeVar("T")

DEFAULT_BUDGET_S = 180.0
BASE_DELAY_S = 0.2
MAX_DELAY_S = 10.0

# Texts of transient faults (plain substrings).
_TRANSIENT_TEXT = (
    "AWS Error NETWORK_CONNECTION", "AWS Error SLOW_DOWN", "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error INTERNAL_FAILURE", "AWS Error THROTTLING", "AWS Error REQUEST_TIMEOUT",
    "HTTP status 500", "HTTP status 502", "HTTP status 503", "HTTP status 504",
    "curlCode", "Couldn't connect", "Could not connect", "Timeout", "timed out",
    "Connection reset", "Connection refused", "Connection aborted", "Broken pipe", "Connection was closed",
    "SlowDown", "Slow Down", "Please reduce your request rate", "ServiceUnavailable", "Service Unavailable",
    "InternalError", "Internal Server Error", "Bad Gateway", "BadGateway", "Gateway Timeout",
    "RequestTimeout", "Throttl",
)
# Texts that settle a failure as permanent even when a transient word also appears in it.
_PERMANENT_TEXT = (
    "NoSuchBucket", "NO_SUCH_BUCKET", "NoSuchKey", "NO_SUCH_KEY", "AccessDenied", "ACCESS_DENIED",
    "InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH",
    "ExpiredToken", "InvalidBucketName", "HTTP status 400", "HTTP status 401", "HTTP status 403",
    "HTTP status 404",
)
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    FileExistsError, ValueError, TypeError, KeyError, NotImplementedError)
# Transport failures by class name (botocore, urllib3, aiohttp, http.client), without importing them.
_TRANSIENT_CLASSES = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError", "ProtocolError",
    "IncompleteRead", "RemoteDisconnected", "NewConnectionError", "ClientConnectionError",
    "ClientConnectorError", "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientPayloadError",
})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
    "RequestThrottled", "TooManyRequestsException", "RequestLimitExceeded", "BadGateway", "GatewayTimeout",
    "500", "502", "503", "504",
})


class RetryBudgetExceeded(StorageError):
    """A transient fault outlasted the retry budget; the message is one redacted line that says what to do.

    Picklable with its attributes (it crosses Ray task boundaries on its way to the driver)."""

    def __init__(self, message: str, op: str = "", url: str = "") -> None:
        super().__init__(message)
        self.op, self.url = op, url

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.op, self.url)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------------
# process-wide state: budget and retry counts

_lock = threading.Lock()
_budget_s = DEFAULT_BUDGET_S
_counts: dict[str, int] = {}


def set_budget(seconds: float) -> None:
    """Set how long transient faults are retried, from the first failure (the job's ``--retry-budget-s``;
    each Ray worker sets the same value, since module state is per process)."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"retry budget must be a finite number of seconds >= 0, got {seconds!r}")
    global _budget_s
    _budget_s = float(seconds)


def budget() -> float:
    return _budget_s


def retry_counts() -> dict[str, int]:
    """Retries per operation in this process so far (a copy)."""
    with _lock:
        return dict(_counts)


def take_retry_counts() -> dict[str, int]:
    """Retries per operation since the last call, and reset: workers report these deltas to the driver."""
    with _lock:
        out = dict(_counts)
        _counts.clear()
    return out


def merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Sum of two per-operation count dicts (new dict)."""
    out = dict(a)
    for op, n in b.items():
        out[op] = out.get(op, 0) + n
    return out


# ----------------------------------------------------------------------------------------------------
# classification


def _client_error_verdict(exc: BaseException) -> bool | None:
    """botocore ``ClientError``: by its code / HTTP status; None for other errors."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _TRANSIENT_CODES or status in (500, 502, 503, 504)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` may succeed (the store or the network is briefly unwell).

    Unknown errors are permanent: a wrong guess here costs a whole budget of waiting per call."""
    return _is_transient(exc, depth=0)


def _is_transient(exc: BaseException, depth: int) -> bool:
    if isinstance(exc, StorageError) or isinstance(exc, _PERMANENT_TYPES):
        return False  # already decided (a nested retry gave up) or settled by type
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if (verdict := _client_error_verdict(exc)) is not None:
        return verdict
    if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(exc).__mro__):
        return True
    text = str(exc)
    if any(marker in text for marker in _PERMANENT_TEXT):
        return False
    if any(marker in text for marker in _TRANSIENT_TEXT):
        return True
    # s3fs and friends re-raise a translated error while handling the client's own one: ask that one
    inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return inner is not None and depth < 3 and _is_transient(inner, depth + 1)


def configure_ray_data(ctx: Any) -> None:
    """Turn Ray Data's own I/O retries off (``ctx``: a ``ray.data.DataContext``): the job hands Ray Data a
    filesystem whose every call already runs under this module (``pipeline.retrying_fs``).

    Ray 2.60 (``ray/data/context.py``: ``retried_io_errors``, default AWS Error INTERNAL_FAILURE /
    NETWORK_CONNECTION / SLOW_DOWN / UNKNOWN (HTTP status 503) / SERVICE_UNAVAILABLE) wraps the filesystems of
    its file datasources in ``RetryingPyFileSystem``, which retries opens and listings (not reads) up to 10
    times with up to 32 s of backoff, matching ``"ExcType: message"`` against those texts. Stacked on ours it
    would retry our ``RetryBudgetExceeded`` (its message quotes the last transient error) for minutes more.
    Cleared in place: assigning a new list makes Ray warn that substring matching is deprecated."""
    ctx.retried_io_errors.clear()


# ----------------------------------------------------------------------------------------------------
# the loop


def _one_line(text: object) -> str:
    return " ".join(redact(text).split())


def retry_call(op: str, url: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retrying transient faults until the budget is spent.

    ``op`` names the operation (``read``, ``write``, ``list``...) in logs, counts and the final error; ``url``
    is the object (redacted before it is shown). Permanent errors propagate at once, unchanged.
    """
    first_failure: float | None = None
    attempts = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified right here
            if not is_transient(exc):
                raise
            attempts += 1
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            remaining = _budget_s - (now - first_failure)
            last = f"{type(exc).__name__}: {exc}"
        if remaining <= 0:
            break
        delay = min(remaining, random.uniform(0.0, min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (attempts - 1))))
        log.warning("retrying %s %s (attempt %d failed, next in %.1f s): %s",
                    op, redact(url), attempts, delay, _one_line(last))
        with _lock:
            _counts[op] = _counts.get(op, 0) + 1
        time.sleep(delay)
    waited = time.monotonic() - first_failure
    raise RetryBudgetExceeded(
        _one_line(f"{op} {url} failed for {waited:.0f} s ({attempts} attempts): {last}; the object store may be "
                  "unavailable: rerun with --resume once it is back"), op=op, url=redact(url))
