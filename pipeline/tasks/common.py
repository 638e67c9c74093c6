"""What every task module shares: reading the ground truth where it lies, and the answer-format lines."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from actors.prompt import ANSWER_SUFFIXES

SHORT_ANSWER = ANSWER_SUFFIXES["short"]  # LLaVA-1.5: "Answer the question using a single word or phrase."
OPTION_ANSWER = ANSWER_SUFFIXES["option"]  # "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Reader:
    """Reads ground-truth files by path, file:// or s3:// URL (the job's ``--s3-endpoint`` applies)."""

    s3_endpoint: str | None = None

    def __call__(self, url: str) -> bytes:
        from pipeline.storage import read_bytes

        return read_bytes(url, s3_endpoint=self.s3_endpoint)

    def list(self, url: str) -> list[str]:
        """Every file under ``url`` (recursive, sorted), ``[url]`` for a file."""
        from pipeline.storage import list_files

        return list_files(url, s3_endpoint=self.s3_endpoint)

    def json(self, url: str) -> Any:
        return json.loads(self(url))


def with_suffix(question: str, suffix: str) -> str:
    """``question`` with LLaVA's answer-format line after a newline (once: files that carry it keep theirs)."""
    q = question.strip()
    return q if not suffix or q.endswith(suffix) else f"{q}\n{suffix}"


def require(annotations: str | None, task: str, what: str) -> str:
    """``annotations`` or a ValueError that says which file the task needs."""
    if not annotations:
        raise ValueError(f"--task {task} needs --annotations: {what}")
    return annotations


def image_bytes(value: Any) -> bytes | None:
    """The encoded image of a Hugging Face Parquet image cell ({'bytes', 'path'} dict, or bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, Mapping):
        data = value.get("bytes")
        return bytes(data) if data else None
    if isinstance(value, (list, tuple)) and value:  # SEED-Bench: a list of images (one for image items)
        return image_bytes(value[0])
    return None
