"""Small previews stored beside each image, so a contact sheet of thousands of images loads in kilobytes.

Workers write one when they upload an image; the dashboard and `archfarm sheet` read it, and make one from the
PNG for images stored before thumbnails existed.
"""

from __future__ import annotations

import io
from pathlib import PurePosixPath

from PIL import Image

THUMBNAIL_PX = 256
"""The long side of a thumbnail: sharp in a dashboard cell, a few kilobytes as JPEG."""

CONTENT_TYPE = "image/jpeg"


def thumbnail_key(key: str) -> str:
    """`plan/style/seed-1_abc.png` → `plan/style/seed-1_abc.thumb.jpg`, beside the image (of any format)."""
    return str(PurePosixPath(key).with_suffix(".thumb.jpg"))


def thumbnail(image: Image.Image) -> bytes:
    """A JPEG with a long side of at most `THUMBNAIL_PX` (never enlarged)."""
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS, reducing_gap=2.0)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=82, optimize=True)
    return buffer.getvalue()


def thumbnail_of_png(png: bytes) -> bytes:
    """The thumbnail of a stored PNG (images written before thumbnails were)."""
    with Image.open(io.BytesIO(png)) as image:
        return thumbnail(image)
