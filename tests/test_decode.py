"""Row decoding on real encoded images: every bad input becomes an error string, never an exception."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageChops, JpegImagePlugin

from pipeline.decode import DEFAULT_MIN_SIDE, decode_image, validate_question
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


def gif_with_frame(screen: int, frame: int) -> bytes:
    """A GIF whose 1st frame (``frame`` x ``frame``) outgrows its ``screen`` x ``screen`` canvas: PIL grows the
    canvas while opening it and runs its own bomb check on the grown size (not visible in the header)."""
    header = b"GIF89a" + struct.pack("<HHBBB", screen, screen, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, frame, frame, 0)
    return header + descriptor + b"\x02\x02\x4c\x01\x00;"


def test_pixel_bound_and_decompression_bombs():
    data = encode(Image.new("RGB", (64, 64)))
    failed(decode_image(data, max_pixels=1000), "64x64 = 4096 pixels exceeds the decompression-bomb bound of 1000")
    assert decode_image(data, max_pixels=4096)[1] is None
    # far over the default bound (and PIL's own hard limit): refused from the header, before any pixel is decoded
    failed(decode_image(png_header_only(50000, 50000)),
           f"image: 50000x50000 = 2500000000 pixels exceeds the decompression-bomb bound of {2**28}")
    limit = Image.MAX_IMAGE_PIXELS
    # max_pixels, not PIL's process-wide limit, is the bound: a header between PIL's warning and error limits
    # (1.5x) or above its error limit (3x) but within max_pixels is decoded (here: no pixel data -> cannot decode)
    for factor in (1.5, 3):
        side = int((factor * limit) ** 0.5)
        failed(decode_image(png_header_only(side, side), max_pixels=10 * limit), "image: cannot decode")
        failed(decode_image(png_header_only(side, side), max_pixels=limit),
               f"{side}x{side} = {side * side} pixels exceeds the decompression-bomb bound of {limit}")
    # PIL's own refusal (a size the header does not show) stays a row error
    failed(decode_image(gif_with_frame(1, 20000)), "image: decompression bomb refused", "DOS attack")


def structured(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like test image: smooth gradients and a disc (drawn at 1/8 size, upscaled) plus fine noise."""
    small_w, small_h = max(1, width // 8), max(1, height // 8)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    r = 127 + 100 * np.sin(x / 12.0) * np.cos(y / 16.0)
    g = 255 * x / small_w
    b = 127 + 100 * np.sin((x + y) / 26.0)
    rgb = np.stack([r, g, b], axis=-1)
    rgb[(x - small_w / 3) ** 2 + (y - small_h / 2) ** 2 < (min(small_w, small_h) / 5) ** 2] = (240, 30, 30)
    base = Image.fromarray(rgb.astype(np.uint8), "RGB").resize((width, height), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(seed).integers(0, 41, (height, width, 3), dtype=np.uint8)
    return ImageChops.add(base, Image.fromarray(noise, "RGB"), offset=-20)


def processor_view(image: Image.Image, side: int = 336) -> np.ndarray:
    """What a CLIP-style processor sees: shortest side resized to ``side`` (bicubic), center crop."""
    scale = side / min(image.size)
    w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    resized = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(resized.crop((left, top, left + side, top + side)), dtype=np.float32)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("big") / "camera.jpg"
    structured(6000, 6000).save(path, "JPEG", quality=85)
    return path.read_bytes()


def test_camera_jpeg_decoded_reduced_with_draft(big_jpeg, monkeypatch):
    decoded_at = []  # the size the JPEG decoder fills: what the decode holds in memory
    original_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        decoded_at.append(self.size)
        return original_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    image = ok(decode_image(big_jpeg))
    # ~1.7 MB decoded instead of 108 MB: never a full-size buffer
    assert decoded_at and set(decoded_at) == {(750, 750)}
    monkeypatch.undo()
    # 6000 / 8 = 750: libjpeg's 1/8 DCT scaling was used (a box reduction of a full decode would give 857 or 6000)
    assert image.size == (750, 750)
    assert DEFAULT_MIN_SIDE <= min(image.size) <= 2 * DEFAULT_MIN_SIDE
    # the tower's input size sets the target: 1/4 keeps 1500 >= 2 x 448 (1/8 would give 750 < 896)
    assert ok(decode_image(big_jpeg, min_side=2 * 448)).size == (1500, 1500)
    assert ok(decode_image(big_jpeg, min_side=None)).size == (6000, 6000)  # full resolution on request
    with Image.open(io.BytesIO(big_jpeg)) as full:
        reference = processor_view(full.convert("RGB"))
    diff = np.abs(processor_view(image) - reference).mean()
    assert diff < 1.5, diff  # what the model sees does not change meaningfully


def test_large_png_reduced_aspect_kept():
    source = structured(6000, 4000, seed=1)
    image = ok(decode_image(encode(source, "PNG", compress_level=1)))
    assert image.size == (1200, 800)  # 4000 // 672 = 5: box-reduced by 5, 3:2 kept
    assert DEFAULT_MIN_SIDE <= min(image.size) <= 2 * DEFAULT_MIN_SIDE
    diff = np.abs(processor_view(image) - processor_view(source)).mean()
    assert diff < 1.5, diff
    # odd sizes round up, aspect ratio within a pixel; small images are left as they are
    odd = ok(decode_image(encode(Image.new("RGB", (2001, 1403), (5, 6, 7)))))
    assert odd.size == (1001, 702) and odd.getpixel((1000, 701)) == (5, 6, 7)
    assert ok(decode_image(encode(Image.new("RGB", (1000, 700))))).size == (1000, 700)
    assert ok(decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3))))).getpixel((0, 0)) == (1, 2, 3)


def test_reduced_modes_keep_their_conversion():
    rgba = Image.new("RGBA", (2000, 1400), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 1000, 1400))  # transparent left half -> white
    image = ok(decode_image(encode(rgba)))
    assert image.size == (1000, 700)
    assert image.getpixel((10, 10)) == (255, 255, 255) and image.getpixel((990, 10)) == (0, 0, 255)
    wide = ok(decode_image(encode(Image.fromarray(np.full((1400, 2000), 65535, dtype=np.uint16)))))
    assert wide.size == (1000, 700) and wide.getpixel((5, 5)) == (255, 255, 255)
    cmyk = ok(decode_image(encode(Image.new("CMYK", (6000, 4000), (0, 255, 255, 0)), "JPEG", quality=90)))
    assert cmyk.size == (1500, 1000)  # draft on a CMYK JPEG: 1/4 keeps 1000 >= 672
    r, g, b = cmyk.getpixel((700, 500))
    assert r > 200 and g < 60 and b < 60


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
