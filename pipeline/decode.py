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
import struct
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageSequence, JpegImagePlugin

from pipeline.retry import RetryBudgetExceeded
from pipeline.storage import read_bytes, redact

# The decompression-bomb bound: images claiming more pixels are refused per row before any pixel is decoded.
# 2**28 (~268 MP) is far above any camera photo (36 MP: 6000x6000; 100-150 MP medium format). It replaces PIL's
# own, process-wide limit (Image.MAX_IMAGE_PIXELS, ~89 MP warning / ~179 MP error), so that it is configurable
# per job (--max-pixels) in both directions. Ordinary images are never near it: they are decoded reduced.
DEFAULT_MAX_PIXELS = 2**28
# Images are decoded reduced to keep their shortest side >= this (and < 2x this where the image allows):
# twice a CLIP-style tower's input (336), whose processor resizes the shortest side to 336 anyway.
DEFAULT_MIN_SIDE = 2 * 336
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
    min_side: int | None = DEFAULT_MIN_SIDE,
    read_uri: Callable[[str], bytes] | None = None,
) -> tuple[Image.Image | None, str | None]:
    """Decode one row's image to RGB: ``(image, None)`` or ``(None, error)``; never raises.

    ``image`` (encoded bytes) wins when non-null, else ``image_uri`` is read with ``read_uri``
    (default: ``pipeline.storage.read_bytes``, i.e. paths, file:// and s3:// with the AWS env vars).

    Large images are decoded reduced, aspect ratio kept, to a shortest side of at least ``min_side``
    (below ``2 * min_side`` where the image allows; smaller images are left as they are): JPEGs through
    the decoder's DCT scaling (``Image.draft``: 1/2, 1/4, 1/8, so a 36 MP photo never lives in memory at
    full size), then, like every other format, by an integer box reduction (``Image.reduce``). Pass the
    tower's input size times 2 (the default: 2 x 336) or ``None`` for full resolution.

    Errors: missing/empty/undecodable/truncated data, and decompression bombs: images whose header
    claims more than ``max_pixels`` (refused before any pixel is decoded; this bound replaces PIL's
    process-wide ``Image.MAX_IMAGE_PIXELS``), and whatever PIL still refuses as one itself (e.g. a GIF
    frame growing its canvas). Animated images give their first frame. The one exception raised:
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

        data = bytes(data)
        with warnings.catch_warnings():
            # max_pixels is the bound: PIL's warning (Image.MAX_IMAGE_PIXELS < size <= 2x) is not a refusal here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                opened = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as exc:
                # over 2x PIL's limit: read the header without PIL's check, so max_pixels decides (and the
                # row gets its size in the error); where that fails too, PIL's refusal is the row's error
                opened = _open_header(data)
                if opened is None:
                    raise exc from None
            with opened:
                width, height = opened.size
                if width < 1 or height < 1:
                    return None, f"{column}: invalid size {width}x{height}"
                if width * height > max_pixels:
                    return None, (
                        f"{column}: {width}x{height} = {width * height} pixels exceeds the "
                        f"decompression-bomb bound of {max_pixels}"
                    )
                frame = next(iter(ImageSequence.Iterator(opened)))  # first frame of an animation
                if min_side and isinstance(frame, JpegImagePlugin.JpegImageFile):
                    _draft_jpeg(frame, min_side)
                frame.load()
                image = _reduce(_to_rgb(frame), min_side)
                return (image.copy() if image is frame else image), None
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


def _open_header(data: bytes) -> Image.Image | None:
    """``Image.open`` minus PIL's process-wide pixel-count check, for images PIL refuses outright (over
    2 x ``Image.MAX_IMAGE_PIXELS``, ~179 MP): the same plugin search (PIL's registry, as ``Image.open``
    does it), no pixel decoded. ``None`` where no plugin reads the header (or one refuses it as a bomb
    itself): the caller then reports PIL's own refusal. Setting ``Image.MAX_IMAGE_PIXELS`` instead would
    change it for every thread of the process."""
    prefix = data[:16]
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None:
            accepted = accept(prefix)
            if not accepted or isinstance(accepted, str):
                continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
        except Exception:  # noqa: BLE001 - e.g. a plugin's own bomb check: PIL's refusal stands
            return None
    return None


def _draft_jpeg(frame: JpegImagePlugin.JpegImageFile, min_side: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale (the largest that keeps the shortest side >= min_side)."""
    width, height = frame.size
    scale = next(s for s in (8, 4, 2, 1) if min(width, height) // s >= min_side or s == 1)
    if scale > 1:
        # draft picks the largest of 8/4/2/1 <= min(width // w, height // h): exactly ``scale`` here
        frame.draft("RGB", (width // scale, height // scale))


def _reduce(image: Image.Image, min_side: int | None) -> Image.Image:
    """Box-reduce by the largest integer factor that keeps the shortest side >= min_side (same aspect)."""
    if not min_side:
        return image
    factor = min(image.size) // min_side
    return image.reduce(factor) if factor >= 2 else image


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
