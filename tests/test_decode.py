"""Row decoding on real encoded images: every bad input becomes an error string, never an exception."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import decode_image, validate_question
from pipeline.shapes import item_row, make_item


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims ``width`` x ``height`` (1-bit grayscale), with no pixel data.

    Lets the bomb checks fire without allocating or compressing a huge image in the test.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def ok(result):
    image, error = result
    assert error is None, error
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return image


def failed(result, *fragments: str) -> str:
    image, error = result
    assert image is None and isinstance(error, str)
    for fragment in fragments:
        assert fragment in error, error
    return error


def test_shapes_png_roundtrip():
    row = item_row(make_item(0, "test", 0))
    image = ok(decode_image(row["image"]))
    assert image.size == (64, 64)


def test_jpeg_and_1x1():
    rgb = Image.new("RGB", (5, 3), (200, 10, 10))
    image = ok(decode_image(encode(rgb, "JPEG", quality=95)))
    assert image.size == (5, 3) and abs(image.getpixel((2, 1))[0] - 200) < 8
    assert ok(decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3))))).getpixel((0, 0)) == (1, 2, 3)


def test_cmyk_jpeg_converted():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = ok(decode_image(encode(cmyk, "JPEG", quality=95))).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half red over white
    image = ok(decode_image(encode(rgba)))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0))[0] == 255 and 120 < image.getpixel((1, 0))[1] < 135
    assert image.getpixel((2, 2)) == (0, 0, 255)


def test_grayscale_palette_and_bilevel():
    assert ok(decode_image(encode(Image.new("L", (3, 3), 77)))).getpixel((1, 1)) == (77, 77, 77)
    assert ok(decode_image(encode(Image.new("1", (3, 3), 1)))).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((3, 3), 1)
    image = ok(decode_image(encode(pal)))
    assert image.getpixel((0, 0)) == (10, 20, 30) and image.getpixel((3, 3)) == (200, 100, 50)
    pal.info["transparency"] = 0
    image = ok(decode_image(encode(pal, transparency=0)))
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((3, 3)) == (200, 100, 50)


def test_16bit_grayscale_is_rescaled_not_clipped():
    values = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = ok(decode_image(data))
    gray = [image.getpixel((x, y))[0] for y in range(2) for x in range(2)]
    assert gray == [0, 128, 255, 1]  # clipping would have made 32768 and 257 white


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    r, g, b = ok(decode_image(data)).getpixel((3, 3))
    assert r > 200 and g < 50 and b < 50


@pytest.mark.parametrize(
    "data, fragments",
    [
        (None, ("image: missing",)),
        (b"", ("image: empty",)),
        (b"definitely not an image", ("image: cannot decode", "UnidentifiedImageError")),
        ("a string", ("image: expected encoded image bytes", "str")),
    ],
)
def test_bad_bytes(data, fragments):
    failed(decode_image(data), *fragments)


def test_truncated_png_and_jpeg():
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = encode(noisy, fmt)
        failed(decode_image(data[: len(data) // 2]), "image: cannot decode")


def test_pixel_limit_and_decompression_bombs():
    data = encode(Image.new("RGB", (64, 64)))
    failed(decode_image(data, max_pixels=1000), "64x64 = 4096 pixels exceeds the limit of 1000")
    assert decode_image(data, max_pixels=4096)[1] is None
    limit = Image.MAX_IMAGE_PIXELS
    # between PIL's limit and twice it PIL only warns; the warning counts as an error here
    side = int((1.5 * limit) ** 0.5)
    failed(decode_image(png_header_only(side, side), max_pixels=10 * limit), "decompression bomb")
    side = int((3 * limit) ** 0.5)  # above 2x PIL raises DecompressionBombError itself
    failed(decode_image(png_header_only(side, side), max_pixels=10 * limit), "decompression bomb")
    # below PIL's limit, above the configurable default: refused before any pixel is decoded
    failed(decode_image(png_header_only(5000, 5000)), "5000x5000 = 25000000 pixels exceeds the limit")


def test_image_uri_local_and_errors(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(encode(Image.new("RGB", (2, 2), (9, 9, 9))))
    assert ok(decode_image(None, str(path))).getpixel((0, 0)) == (9, 9, 9)
    assert ok(decode_image(None, f"file://{path}")).size == (2, 2)
    # bytes win over the uri
    assert ok(decode_image(encode(Image.new("RGB", (3, 3))), "/does/not/exist")).size == (3, 3)
    failed(decode_image(None, str(tmp_path / "missing.png")), "image_uri: cannot read")
    failed(decode_image(None, "   "), "image: missing")
    (tmp_path / "bad.png").write_bytes(b"junk")
    failed(decode_image(None, str(tmp_path / "bad.png")), "image_uri: cannot decode")
    seen = []
    custom = decode_image(None, "mem://x", read_uri=lambda uri: seen.append(uri) or path.read_bytes())
    assert ok(custom).size == (2, 2) and seen == ["mem://x"]


def test_image_uri_on_s3(s3_server, tmp_bucket):
    s3_server.client.put_object(Bucket=tmp_bucket, Key="imgs/a.png", Body=encode(Image.new("RGB", (4, 4), (1, 1, 1))))
    assert ok(decode_image(None, f"s3://{tmp_bucket}/imgs/a.png")).size == (4, 4)
    error = failed(decode_image(None, f"s3://{tmp_bucket}/imgs/none.png"), "image_uri: cannot read")
    assert s3_server.secret_key not in error


@pytest.mark.parametrize(
    "question, expected",
    [
        ("What color is the circle?", None),
        (None, "question: null"),
        ("", "question: blank"),
        ("  \n\t", "question: blank"),
        (42, "question: expected a string, got int"),
        (b"bytes?", "question: expected a string, got bytes"),
        ("x" * 2001, "question: 2001 characters exceeds the limit of 2000"),
    ],
)
def test_validate_question(question, expected):
    assert validate_question(question) == expected


def test_decode_error_text_is_the_same_in_every_run():
    """PIL's message names the in-memory file by address; the row's error must not (reruns compare equal)."""
    first = decode_image(b"definitely not an image")[1]
    again = decode_image(bytearray(b"definitely not an image"))[1]
    assert first == again and "0x" not in first and "UnidentifiedImageError" in first
