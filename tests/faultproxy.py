"""A fault-injecting HTTP/1.1 proxy for tests, in front of the moto S3 server.

Clients (pyarrow's AWS SDK, boto3, s3fs, Ray Data workers) are simply pointed at ``proxy.endpoint``
instead of the store. The proxy understands just enough HTTP to work per *request* (keep-alive
connections carry many): it reads each request head and body (Content-Length or chunked), then
either answers it with S3's XML error itself or forwards it and relays the response.

* ``outage(seconds)``: every open connection is reset (RST, like a dropped network path) and new
  ones are accepted and reset at once, so clients see "connection reset" errors until it ends.
* ``set_error_rate(rate, status, code, methods)``: that fraction of requests (of those HTTP methods, or all)
  is answered with an S3 error (default ``503 Slow Down`` / ``SlowDown``); HEAD requests get the status
  without a body, as from S3.

Everything runs in daemon threads of the test process; ``counts`` says what happened.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

_POLL_S = 0.05  # how often blocked reads look for an outage or stop
_REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}
_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "InternalError": "We encountered an internal error. Please try again.",
    "AccessDenied": "Access Denied",
}


class _Cut(Exception):
    """The proxy decided to drop this connection (outage or stop)."""


class _Reader:
    """Buffered reads from a socket that give up (``_Cut``) as soon as ``alive()`` turns false."""

    def __init__(self, sock: socket.socket, alive: Callable[[], bool]) -> None:
        self.sock, self.alive, self.buf = sock, alive, bytearray()

    def _fill(self) -> bool:
        while True:
            if not self.alive():
                raise _Cut
            ready, _, _ = select.select([self.sock], [], [], _POLL_S)
            if ready:
                data = self.sock.recv(1 << 16)
                self.buf += data
                return bool(data)

    def _take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def until(self, delim: bytes) -> bytes | None:
        """Bytes up to and including ``delim``; None on a clean EOF before any byte."""
        while (i := self.buf.find(delim)) < 0:
            if not self._fill():
                if self.buf:
                    raise ConnectionError("truncated message")
                return None
        return self._take(i + len(delim))

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("truncated body")
        return self._take(n)

    def chunked(self) -> bytes:
        """A raw chunked body (chunks, last chunk and trailers), as received."""
        out = bytearray()
        while True:
            line = self.until(b"\r\n") or b""
            out += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := self.until(b"\r\n")) not in (b"\r\n", None):
                    out += trailer
                return bytes(out + b"\r\n")
            out += self.exactly(size + 2)

    def to_eof(self) -> bytes:
        while self._fill():
            pass
        return self._take(len(self.buf))


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line]
    return lines[0], headers  # type: ignore[return-value]


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


def _read_body(reader: _Reader, headers: list[tuple[str, str]], *, to_eof: bool = False) -> bytes:
    if "chunked" in _header(headers, "transfer-encoding").lower():
        return reader.chunked()
    if length := _header(headers, "content-length"):
        return reader.exactly(int(length))
    return reader.to_eof() if to_eof else b""


def _reset(sock: socket.socket | None) -> None:
    """Close with an RST instead of a FIN: what clients see when a network path drops."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """Fault-injecting proxy on 127.0.0.1:<free port> in front of ``upstream`` (an http:// URL)."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._epoch = 0  # bumped by outage()/stop(): connections of older epochs are cut
        self._down_until = 0.0
        self._stopping = False
        self._rate, self._status, self._code = 0.0, 503, "SlowDown"
        self._methods: tuple[str, ...] | None = None
        self._counts = {"requests": 0, "forwarded": 0, "errors_injected": 0, "connections_cut": 0,
                        "connections_refused": 0}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S)
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        assert self._listener is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def outage(self, seconds: float) -> None:
        """From now on for ``seconds``: reset every open connection and every new one."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            self._epoch += 1

    def set_error_rate(self, rate: float, status: int = 503, code: str = "SlowDown",
                       methods: tuple[str, ...] | None = None) -> None:
        """Answer ``rate`` (0..1) of the requests (of the HTTP ``methods`` given, else all) with an S3 XML
        error ``code`` and HTTP ``status``."""
        with self._lock:
            self._rate, self._status, self._code = rate, status, code
            self._methods = tuple(m.upper() for m in methods) if methods else None

    def heal(self) -> None:
        """End any outage and stop injecting errors."""
        with self._lock:
            self._down_until, self._rate = 0.0, 0.0

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._epoch += 1
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving ---------------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if time.monotonic() < self._down_until:
                self._count("connections_refused")
                _reset(client)
                continue
            epoch = self._epoch
            threading.Thread(target=self._serve, args=(client, epoch), daemon=True).start()

    def _fault(self, method: str) -> tuple[int, str] | None:
        with self._lock:
            self._counts["requests"] += 1
            if self._methods is not None and method not in self._methods:
                return None
            if self._rate > 0 and self._rng.random() < self._rate:
                self._counts["errors_injected"] += 1
                return self._status, self._code
        return None

    def _serve(self, client: socket.socket, epoch: int) -> None:
        def alive() -> bool:
            return self._epoch == epoch and not self._stopping

        client.setblocking(True)
        reader, upstream, up_reader = _Reader(client, alive), None, None
        try:
            while (head := reader.until(b"\r\n\r\n")) is not None:
                request_line, headers = _parse_head(head)
                method = request_line.split(" ", 1)[0].upper()
                if "100-continue" in _header(headers, "expect").lower():  # we answer it ourselves
                    headers = [(k, v) for k, v in headers if k.lower() != "expect"]
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(reader, headers)
                close = _header(headers, "connection").lower() == "close"
                if (fault := self._fault(method)) is not None:
                    client.sendall(_error_response(*fault, method=method, target=request_line.split(" ")[1]))
                    if close:
                        break
                    continue
                raw = (request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n")
                for _ in range(2):  # a pooled upstream connection may have gone idle-closed
                    if upstream is None:
                        upstream = socket.create_connection(self.upstream, timeout=30)
                        up_reader = _Reader(upstream, alive)
                    upstream.sendall(raw.encode("latin-1") + body)
                    assert up_reader is not None
                    if (resp_head := up_reader.until(b"\r\n\r\n")) is not None:
                        break
                    upstream.close()
                    upstream = None
                else:
                    raise ConnectionError("upstream closed the connection")
                status_line, resp_headers = _parse_head(resp_head)
                status = int(status_line.split(" ")[1])
                no_body = method == "HEAD" or status in (204, 304) or status < 200
                until_eof = not no_body and not _header(resp_headers, "content-length") and \
                    "chunked" not in _header(resp_headers, "transfer-encoding").lower()
                resp_body = b"" if no_body else _read_body(up_reader, resp_headers, to_eof=True)
                client.sendall(resp_head + resp_body)
                self._count("forwarded")
                if close or until_eof or _header(resp_headers, "connection").lower() == "close":
                    break
            client.close()
        except _Cut:
            self._count("connections_cut")
            _reset(client)
        except OSError:
            _reset(client)
        finally:
            if upstream is not None:
                upstream.close()


def _error_response(status: int, code: str, *, method: str, target: str) -> bytes:
    """S3's error answer: XML body naming ``code``; no body for HEAD (S3 sends none there either)."""
    reason = "Slow Down" if code == "SlowDown" else _REASONS.get(status, "Error")
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
           f"<Message>{_MESSAGES.get(code, code)}</Message><Resource>{target.split('?')[0]}</Resource>"
           f"<RequestId>faultproxy</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(xml)}\r\nx-amz-request-id: faultproxy\r\n\r\n").encode()
    return head if method == "HEAD" else head + xml
