"""decode_image on the plans users really upload, and on the uploads that must be refused politely."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, UnidentifiedImageError

from shared.errors import PlanError
from shared.images import content_hash, decode_image

LIMIT = 80_000_000  # the default of Settings.max_image_pixels
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(data: bytes, *, max_pixels: int = LIMIT) -> Image.Image:
    return decode_image(data, "plans/a.png", max_pixels=max_pixels)


def refusal(data: bytes, *, name: str = "plans/a.png", max_pixels: int = LIMIT) -> str:
    """The PlanError message for `data`, checked to be one line that starts with the plan's name."""
    with pytest.raises(PlanError) as caught:
        decode_image(data, name, max_pixels=max_pixels)
    message = str(caught.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message and "\r" not in message
    return message


def png_of_one_colour(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, compressed a row at a time: a bomb of a few kilobytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte, then packed pixels
    pixels = b"".join(compressor.compress(row * 1000) for _ in range(height // 1000))
    pixels += compressor.compress(row * (height % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def rgba_plan() -> Image.Image:
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent *black*: what convert("RGB") would show
    image.paste((0, 0, 0, 255), (8, 8, 24, 24))
    return image


def la_plan() -> Image.Image:
    image = Image.new("LA", (32, 32), (0, 0))
    image.paste((0, 255), (8, 8, 24, 24))
    return image


def palette_plan() -> Image.Image:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 0, 0, 0])  # index 0, the background, becomes the transparent one
    image.paste(1, (8, 8, 24, 24))
    return image


@pytest.mark.parametrize(
    ("image", "fmt", "params"),
    [
        (rgba_plan(), "PNG", {}),
        (rgba_plan(), "WEBP", {"lossless": True}),
        (la_plan(), "PNG", {}),
        (palette_plan(), "PNG", {"transparency": 0}),
        (palette_plan(), "GIF", {"transparency": 0}),
    ],
    ids=["rgba-png", "rgba-webp", "la-png", "palette-png", "palette-gif"],
)
def test_transparency_is_white_paper(image: Image.Image, fmt: str, params: dict[str, object]) -> None:
    decoded = decode(encode(image, fmt, **params))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == WHITE
    assert decoded.getpixel((16, 16)) == BLACK


def test_grayscale_keeps_its_values() -> None:
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    decoded = np.asarray(decode(encode(image)))
    assert decoded.shape == (16, 16, 3)
    assert (decoded == np.arange(256).reshape(16, 16, 1)).all()


def test_one_bit_is_black_and_white() -> None:
    image = Image.new("1", (16, 8), 1)
    image.paste(0, (0, 0, 8, 8))
    decoded = decode(encode(image))
    assert decoded.getpixel((0, 0)) == BLACK
    assert decoded.getpixel((15, 7)) == WHITE


SIXTEEN_BIT = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.fromarray(SIXTEEN_BIT), "PNG"),  # opens as I;16
        (Image.frombytes("I;16B", (4, 1), SIXTEEN_BIT.astype(">u2").tobytes()), "TIFF"),
        (Image.fromarray(SIXTEEN_BIT.astype(np.int32)), "TIFF"),  # opens as I, 32-bit
    ],
    ids=["png-I;16", "tiff-I;16B", "tiff-I"],
)
def test_sixteen_bit_is_scaled_not_clipped(image: Image.Image, fmt: str) -> None:
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == image.mode
    decoded = np.asarray(decode(data))
    assert decoded[0, :, 0].tolist() == [0, 1, 128, 255]


def test_cmyk_jpeg() -> None:
    image = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    image.paste((255, 0, 0, 0), (0, 0, 8, 16))
    decoded = np.asarray(decode(encode(image, "JPEG", quality=95)), dtype=int)
    assert np.abs(decoded[8, 2] - (0, 255, 255)).max() <= 8  # cyan
    assert np.abs(decoded[8, 13] - WHITE).max() <= 8


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "blue")
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: turn 90° clockwise to view
    decoded = np.asarray(decode(encode(image, "JPEG", exif=exif.tobytes())), dtype=int)
    assert decoded.shape == (40, 20, 3)
    assert np.abs(decoded[5, 10] - (255, 0, 0)).max() <= 8  # the stored left half is now on top
    assert np.abs(decoded[35, 10] - (0, 0, 255)).max() <= 8


def test_large_scan() -> None:
    scan = Image.new("L", (4000, 3000), 255)
    ImageDraw.Draw(scan).rectangle((100, 100, 3900, 2900), outline=0, width=20)
    decoded = decode(encode(scan, "JPEG", quality=85))
    assert (decoded.size, decoded.mode) == ((4000, 3000), "RGB")
    assert decoded.getpixel((110, 1500))[0] < 32


def test_result_is_detached_from_the_upload() -> None:
    decoded = decode(encode(Image.new("RGB", (8, 8), "red")))
    assert type(decoded) is Image.Image  # not a PngImageFile still holding the bytes
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_empty_file() -> None:
    assert refusal(b"") == "plans/a.png: not an image (empty file)"


@pytest.mark.parametrize(
    "data",
    [b"floor plan, ground floor\n", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"],
    ids=["text", "eps"],  # EPS is a format Pillow knows, but opening it would run Ghostscript
)
def test_not_an_image(data: bytes) -> None:
    assert refusal(data) == "plans/a.png: not an image (cannot identify image file)"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    assert refusal(data[: len(data) // 2]).startswith("plans/a.png: truncated or corrupt image (")


def test_bomb_is_refused_from_its_header() -> None:
    data = png_of_one_colour(9000, 9000)
    assert len(data) < 50_000
    assert refusal(data) == ("plans/a.png: 9000×9000 pixels is over the limit of 80000000 (decompression bomb?)")


def test_max_pixels_is_the_limit() -> None:
    data = png_of_one_colour(1000, 1000)
    assert decode(data, max_pixels=1_000_000).size == (1000, 1000)
    assert "1000×1000 pixels is over the limit of 999999" in refusal(data, max_pixels=999_999)


def test_thirty_two_bit_float_is_stretched_over_its_range() -> None:
    floats = Image.fromarray(np.array([[-1.0, 0.0, 1.0, np.nan, np.inf]], dtype=np.float32))
    decoded = np.asarray(decode(encode(floats, "TIFF")))
    assert decoded[0, :, 0].tolist() == [0, 128, 255, 128, 128]  # NaN and infinity count as 0
    extremes = Image.fromarray(np.array([[-3.4e38, 3.4e38]], dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way
        assert np.asarray(decode(encode(extremes, "TIFF")))[0, :, 0].tolist() == [0, 255]


def test_pillows_complaints_stay_quiet(recwarn: pytest.WarningsRecorder) -> None:
    """A TIFF with a broken tag layout: Pillow warns "Corrupt EXIF data" on its way to giving up; the user
    gets archfarm's one-line refusal and none of Pillow's warnings."""
    data = bytearray(encode(Image.new("RGB", (48, 32)), "TIFF"))
    data[2] = 0x2B  # an odd tag layout
    with warnings.catch_warnings(record=True) as pillow, pytest.raises(UnidentifiedImageError):
        warnings.simplefilter("always")
        Image.open(io.BytesIO(bytes(data)))
    assert any("Corrupt EXIF" in str(w.message) for w in pillow)  # what would reach the terminal
    with pytest.raises(PlanError, match="not an image"):
        decode(bytes(data))
    assert [w for w in recwarn if issubclass(w.category, UserWarning)] == []


def test_bomb_over_pillows_own_limit() -> None:
    # 400 million pixels: Pillow refuses inside Image.open, before our check can run.
    message = refusal(png_of_one_colour(20_000, 20_000))
    assert message.startswith("plans/a.png: too many pixels to decode safely (")


def test_pillows_bomb_warning_raised_as_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        message = refusal(png_of_one_colour(10_000, 10_000), max_pixels=200_000_000)
    assert "too many pixels to decode safely" in message


def test_message_stays_on_one_line_whatever_the_name() -> None:
    with pytest.raises(PlanError) as caught:
        decode_image(b"", "evil\nname.png", max_pixels=LIMIT)
    assert str(caught.value) == "evil name.png: not an image (empty file)"


def test_content_hash() -> None:
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    data = encode(Image.new("L", (8, 8)))
    assert content_hash(data) == content_hash(bytes(data)) == hashlib.sha256(data).hexdigest()
    assert content_hash(data) != content_hash(data + b"\0")
