"""An image's look as a small signature: its palette in CIELAB and its texture, for measuring how alike a set
of views is (`shared.consistency`).

Palette: the distribution of lightness (8 bins over L* 0-100) and of chroma (6 × 6 bins over a*, b* in
[-60, 60], clipped): CIELAB, so equal distances are roughly equal perceived differences, and lightness apart
from hue, so a darker render of the same materials reads as a change of light, not of palette. Texture: the
distribution of local contrast (8 bins of log gradient magnitude of L*), which separates smooth plaster from
brick, wood grain or noise. Histograms, not means: two views of one room show different parts of its palette
in different amounts, and a histogram's overlap measures that fairly.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from shared.consistency import CHROMA_BINS, CHROMA_RANGE, LIGHTNESS_BINS, TEXTURE_BINS

_MAX_LOG_GRADIENT = float(np.log1p(400.0))  # Sobel of L* (0-100) reaches a few hundred at hard edges
_SIDE = 256
"""Images are measured at this long side: the signature must not depend on the delivery size."""


def look(image: Image.Image) -> list[float]:
    """The image's signature: lightness, chroma and texture histograms, each summing to 1, concatenated
    (8 + 36 + 8 numbers, rounded to 4 decimals for storage)."""
    rgb = image.convert("RGB")
    scale = _SIDE / max(rgb.size)
    if scale < 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BOX)
    lab = cv2.cvtColor(np.asarray(rgb, dtype=np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    light, _ = np.histogram(lightness, bins=LIGHTNESS_BINS, range=(0.0, 100.0))
    chroma, _, _ = np.histogram2d(
        np.clip(a, -CHROMA_RANGE, CHROMA_RANGE).ravel(),
        np.clip(b, -CHROMA_RANGE, CHROMA_RANGE).ravel(),
        bins=CHROMA_BINS,
        range=((-CHROMA_RANGE, CHROMA_RANGE), (-CHROMA_RANGE, CHROMA_RANGE)),
    )
    gradient = np.hypot(cv2.Sobel(lightness, cv2.CV_32F, 1, 0), cv2.Sobel(lightness, cv2.CV_32F, 0, 1))
    texture, _ = np.histogram(
        np.clip(np.log1p(gradient), 0.0, _MAX_LOG_GRADIENT), bins=TEXTURE_BINS, range=(0.0, _MAX_LOG_GRADIENT)
    )
    parts = [light, chroma.ravel(), texture]
    return [round(float(x), 4) for part in parts for x in part / max(1, part.sum())]
