"""Decode the plan images users upload, trusting nothing about them.

An upload may be empty, not an image, cut short, or a few kilobytes that claim billions of pixels. Each of
those becomes one `PlanError` line that starts with the plan's name; anything that does decode comes back as
a fully loaded RGB image on white paper, whatever mode, bit depth or orientation it was stored in.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shared.errors import PlanError

# The raster formats plans arrive in. Naming them stops Image.open from trying every plugin Pillow has:
# EPS, for one, would hand the upload to Ghostscript.
_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PILLOW_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def content_hash(data: bytes) -> str:
    """SHA-256 of a plan's bytes in hex, so the same upload is recognised however it is named."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, name: str, *, max_pixels: int) -> Image.Image:
    """Decode `data` into an RGB image, or raise `PlanError` saying in one line what is wrong with it.

    `max_pixels` is checked against the size in the header, before any pixel is decoded, so a bomb costs
    nothing. Pillow's own global limit, `Image.MAX_IMAGE_PIXELS`, still applies inside `Image.open`: over it
    Pillow warns, over twice it Pillow refuses before this check runs. The refusal, and the warning where
    warnings are errors, become a `PlanError` too.
    """
    label = _printable(name)
    if not data:
        raise PlanError(label, "not an image (empty file)")
    # Pillow warns about what it repairs (odd EXIF, truncated chunks): the user sees a refusal or nothing.
    # Its bomb warning (a RuntimeWarning) is left to the caller's filters, as documented above.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _decode(data, label, max_pixels)


def _decode(data: bytes, label: str, max_pixels: int) -> Image.Image:
    with _open(data, label) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise PlanError(label, f"{width}×{height} pixels is over the limit of {max_pixels} (decompression bomb?)")
        _load(image, label)
        return _to_rgb(image)


def _open(data: bytes, label: str) -> ImageFile.ImageFile:
    """Read the header only: Image.open is lazy, so no pixel is decoded yet."""
    try:
        return Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError:
        # Pillow's message names the BytesIO object, which tells the user nothing.
        raise PlanError(label, "not an image (cannot identify image file)") from None
    except Exception as exc:  # noqa: BLE001 - a plugin that recognised the header may still reject it, with any type
        raise _corrupt(label, exc) from None


def _load(image: ImageFile.ImageFile, label: str) -> None:
    """Decode the pixels and turn them upright, as a phone's EXIF orientation says."""
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, struct.error, ValueError...
        raise _corrupt(label, exc) from None


def _corrupt(label: str, exc: Exception) -> PlanError:
    detail = _printable(str(exc)).strip() or type(exc).__name__
    if isinstance(exc, _PILLOW_BOMBS):
        return PlanError(label, f"too many pixels to decode safely ({detail})")
    return PlanError(label, f"truncated or corrupt image ({detail})")


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image; transparent parts become white paper, where convert("RGB") would show black."""
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        image = _to_gray8(image)
    if image.has_transparency_data:
        paper = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(paper, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _to_gray8(image: Image.Image) -> Image.Image:
    """Scale wide grayscale into 0..255: Pillow's convert clips instead, so a 16-bit plan turns all white."""
    # float64: the widest float32 range still subtracts without overflow. NaN and infinities count as 0.
    pixels = np.nan_to_num(np.array(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and pixels.min() >= 0 and pixels.max() <= 65535):
        # 16-bit samples; Pillow has opened 16-bit PNG and TIFF as mode I, not only as I;16.
        low, high = 0.0, 65535.0
    else:  # 32-bit integer or float samples have no usual range: stretch the one they use
        low, high = float(pixels.min()), float(pixels.max())
    pixels -= low
    pixels *= 255.0 / ((high - low) or 1.0)
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def _printable(text: str) -> str:
    """Replace line breaks and other control characters, so a message stays on one line."""
    return "".join(char if char.isprintable() else " " for char in text)
