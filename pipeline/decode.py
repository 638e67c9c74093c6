"""Per-row input checks for the batch job: image decoding and question validation that never raise.

A bad row must become an output row with an ``error`` (see ``pipeline.schema.error_row``), never a
crashed task that takes its whole block with it. So every function here returns ``(value, error)``
or ``error``, with errors phrased as ``"<column>: <what is wrong>"``.

An unreachable object store is not a bad row: ``image_uri`` reads are retried (``pipeline.retry``), and
once the retry budget is spent ``RetryBudgetExceeded`` propagates and fails the task, so the run can be
resumed later instead of recording every remaining row as an error.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageSequence

from pipeline.retry import RetryBudgetExceeded
from pipeline.storage import read_bytes, redact

# A generous default (4096 x 4096): far above any vision tower's input, far below PIL's bomb limit.
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_QUESTION_CHARS = 2000

# Modes holding more than 8 bits per channel: scaled down, not clipped, to 8 bits.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL mode: alpha composited on white (like transformers' convert_to_rgb),
    16/32-bit grayscale rescaled to 0..255, everything else through PIL's own conversion."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def decode_image(
    image: bytes | None,
    image_uri: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    read_uri: Callable[[str], bytes] | None = None,
) -> tuple[Image.Image | None, str | None]:
    """Decode one row's image to RGB: ``(image, None)`` or ``(None, error)``; never raises.

    ``image`` (encoded bytes) wins when non-null, else ``image_uri`` is read with ``read_uri``
    (default: ``pipeline.storage.read_bytes``, i.e. paths, file:// and s3:// with the AWS env vars).
    Errors: missing/empty/undecodable/truncated data, decompression bombs (PIL's warning is an error
    here), images over ``max_pixels``. Animated images give their first frame. The one exception raised:
    ``RetryBudgetExceeded`` (the store stayed unreachable; a missing object is a row error at once).
    """
    column = "image"
    try:
        if image is None:
            if image_uri is None or not str(image_uri).strip():
                return None, "image: missing (both 'image' and 'image_uri' are null)"
            column = "image_uri"
            reader = read_uri or read_bytes
            try:
                data = reader(str(image_uri))
            except RetryBudgetExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad URI is a bad row
                return None, redact(f"image_uri: cannot read {image_uri}: {type(exc).__name__}: {exc}")
        else:
            data = image
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return None, f"{column}: expected encoded image bytes, got {type(data).__name__}"
        if len(data) == 0:
            return None, f"{column}: empty (0 bytes)"

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as opened:
                width, height = opened.size
                if width < 1 or height < 1:
                    return None, f"{column}: invalid size {width}x{height}"
                if width * height > max_pixels:
                    return None, (
                        f"{column}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                    )
                frame = next(iter(ImageSequence.Iterator(opened)))  # first frame of an animation
                frame.load()
                return _to_rgb(frame.copy()), None
    except RetryBudgetExceeded:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"{column}: decompression bomb refused ({exc})"
    except Exception as exc:  # noqa: BLE001 - undecodable, truncated, unsupported mode, ...
        # PIL names the in-memory file by its address ("<_io.BytesIO object at 0x7f...>"): drop it, so that
        # the same bad row gives the same error text in every run (reruns, sweeps, comparisons)
        text = _OBJECT_ADDRESS.sub(">", str(exc))
        return None, redact(f"{column}: cannot decode: {type(exc).__name__}: {text}")


_OBJECT_ADDRESS = re.compile(r" object at 0x[0-9a-fA-F]+>")


def validate_question(question: object, *, max_chars: int = MAX_QUESTION_CHARS) -> str | None:
    """``None`` for a usable question, else the error for the row's ``error`` column."""
    if question is None:
        return "question: null"
    if not isinstance(question, str):
        return f"question: expected a string, got {type(question).__name__}"
    if not question.strip():
        return "question: blank"
    if len(question) > max_chars:
        return f"question: {len(question)} characters exceeds the limit of {max_chars}"
    return None
