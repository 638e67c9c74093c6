"""A pyarrow filesystem whose every call to the store goes through ``pipeline.retry``: what Ray Data reads with.

Ray Data's ``read_parquet`` touches the store from the driver (listing and footer reads to infer the schema)
and from its read tasks; its own retry setting (``DataContext.retried_io_errors``) covers only some of those
calls, with its own attempts and backoff, and never the reads from an open file. Handing it this wrapper
instead puts all of them under the job's one policy: our transient/permanent table, ``--retry-budget-s``,
a WARNING per retry and the per-operation counts of the summary.

Files are opened lazily and read by offset (``read_at``), so a failed read reopens the object and continues
where it was: a retry never re-reads what was already returned.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import retry


class RetryingHandler(pafs.FileSystemHandler):
    """Delegates to ``fs``, each call retried as ``retry.retry_call(op, url, ...)``."""

    def __init__(self, fs: pafs.FileSystem, prefix: str = "s3://") -> None:
        self.fs, self.prefix = fs, prefix

    def __reduce__(self) -> tuple[Any, ...]:
        if isinstance(self.fs, pafs.S3FileSystem):  # pyarrow's own pickle drops retry_strategy (SDK retries back on)
            return _s3_handler, (self.fs.__reduce__()[1][0], self.prefix)
        return type(self), (self.fs, self.prefix)

    def call(self, op: str, path: str, fn, *args: Any) -> Any:
        return retry.retry_call(op, self.prefix + path, fn, *args)

    def get_type_name(self) -> str:
        return f"retrying-{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def equals(self, other: Any) -> bool:
        return isinstance(other, RetryingHandler) and self.fs.equals(other.fs)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.call("stat", paths[0] if len(paths) == 1 else f"{len(paths)} paths", self.fs.get_file_info, paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.call("list", selector.base_dir, self.fs.get_file_info, selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.call("mkdir", path, self.fs.create_dir, path, recursive)

    def delete_dir(self, path: str) -> None:
        self.call("delete", path, self.fs.delete_dir, path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.call("delete", path, self.fs.delete_dir_contents, path, missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.call("delete", "/", self.fs.delete_dir_contents, "/", False, True)

    def delete_file(self, path: str) -> None:
        self.call("delete", path, self.fs.delete_file, path)

    def move(self, src: str, dest: str) -> None:
        self.call("move", src, self.fs.move, src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.call("copy", src, self.fs.copy_file, src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(RetryingReader(self, path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(RetryingReader(self, path), mode="r")

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return self.fs.open_output_stream(path, metadata=metadata)  # our writes retry whole objects instead

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return self.fs.open_append_stream(path, metadata=metadata)


class RetryingReader(io.RawIOBase):
    """A seekable read-only file over ``handler.fs``: every read is ``read_at`` under the retry policy, and a
    failed read drops the connection so that the next attempt reopens the object."""

    def __init__(self, handler: RetryingHandler, path: str) -> None:
        super().__init__()
        self.handler, self.path, self.pos = handler, path, 0
        self._file: pa.NativeFile | None = None
        self._size: int | None = None

    def _attempt(self, fn):
        try:
            if self._file is None:
                self._file = self.handler.fs.open_input_file(self.path)
            return fn(self._file)
        except Exception:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001, S110 - the connection is gone anyway
                pass
            self._file = None

    def size(self) -> int:
        if self._size is None:
            self._size = self.handler.call("stat", self.path, self._attempt, lambda f: f.size())
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: None}[whence]
        self.pos = (self.size() if base is None else base) + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        want = self.size() - self.pos if n is None or n < 0 else min(n, max(0, self.size() - self.pos))
        if want <= 0:
            return b""
        pos = self.pos
        data = self.handler.call("read", self.path, self._attempt, lambda f: f.read_at(want, pos))
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        self._drop()
        super().close()


def _s3_handler(options: dict[str, Any], prefix: str) -> RetryingHandler:
    """Unpickle: the S3 filesystem rebuilt from its options with the clients' retries off again."""
    from pipeline.storage import CLIENT_MAX_ATTEMPTS

    strategy = pafs.AwsStandardS3RetryStrategy(max_attempts=CLIENT_MAX_ATTEMPTS)
    return RetryingHandler(pafs.S3FileSystem(**options, retry_strategy=strategy), prefix)


def retrying(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs`` under the retry policy (object stores); a local filesystem is returned as it is."""
    if isinstance(fs, pafs.LocalFileSystem):
        return fs
    return pafs.PyFileSystem(RetryingHandler(fs))
