"""Model directories from a local path, ``file://`` or ``s3://`` URL (downloaded once per process).

The llava-hf layout (config.json, safetensors shards, processor/tokenizer files) is read by
transformers from a local directory; remote prefixes are copied into a cache first. Copies are
shared between processes through ``pipeline.storage.download_dir`` (atomic rename of a staging dir)
and memoised per process here.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

_LOCK = threading.Lock()
_RESOLVED: dict[tuple[str, str], str] = {}


def default_cache_dir() -> str:
    return os.environ.get("ACCM_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "accm-model-cache"))


def local_model_dir(url: str, cache_dir: str | None = None) -> str:
    """A local directory with the model files behind ``url`` (local dir, ``file://`` or ``s3://``)."""
    parsed = urlparse(str(url))
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else str(url)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        return path
    cache = cache_dir or default_cache_dir()
    key = (str(url), cache)
    with _LOCK:
        if key not in _RESOLVED:
            from pipeline.storage import download_dir

            _RESOLVED[key] = download_dir(str(url).rstrip("/"), cache)
        return _RESOLVED[key]
