"""Benchmark input files built in a test: photo-like images and the job run in-process on them.

Shared by the job's benchmark-format tests (``test_job_benchmarks*.py``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_args
from tests.jobs import V1_LVLM

SHORT = "Answer the question using a single word or phrase."
OPTION = "Answer with the option's letter from the given choices directly."


def photo(seed: int, size: tuple[int, int] = (640, 480)):
    """A photo-like RGB image: smooth colour gradients, a few blobs, sensor noise."""
    from PIL import Image, ImageDraw

    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(x / w) * 255, (y / h) * 255, ((x + y) / (w + h)) * 255], axis=-1)
    base = (base * rng.uniform(0.4, 1.0, 3) + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(20, 120)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_photos() -> dict[str, bytes]:
    """Four 640x480 photos (two JPEG, two PNG), by file name."""
    out = {}
    for i in range(4):
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        out[f"photo{i}.{ext}"] = encode(photo(i), fmt)
    return out


def image_dir(root: Path, photos: dict[str, bytes], names: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in photos.items():
        if names is None or name in names:
            (root / name).write_bytes(data)
    return root


def jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_job_rows(out: Path | str, *args: str) -> tuple[dict, list[dict]]:
    """Run the job in-process (``--method none``, batch 8) with the first world's LVLM (the formats, readers
    and metrics are under test, not the model); the summary and every output row."""
    from pipeline.graph import run_job

    cfg = parse_args(["--lvlm", V1_LVLM, *args, "--output", str(out), "--method", "none", "--batch-size", "8"])
    summary = run_job(cfg)
    rows: list[dict] = []
    if not str(out).startswith("s3://"):
        for path in sorted(Path(out).rglob("*.parquet")):
            if "_parts" not in path.parts:
                rows.extend(pq.read_table(path).to_pylist())
    return summary, rows


def scored(rows: list[dict]) -> list[dict]:
    """What the job hands the task's aggregate: rows without an error, with a prediction."""
    return [r for r in rows if r["error"] is None and r["prediction"] is not None]


def approx(got, want) -> None:
    """Equal, floats approximately (recursively through dicts/lists), None only for None."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (got, want)
        for k in want:
            approx(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            approx(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (got, want)
    else:
        assert got == want, (got, want)


# Hugging Face Parquet's image column (MME, Flickr30k)


def hf_image(data: bytes, name: str) -> dict:
    return {"bytes": data, "path": name}


HF_IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
