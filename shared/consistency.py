"""How alike a set of views looks: a score per (job, style) from each image's look signature (`workers.look`),
and the images that stray from the set.

Each image's distance to the set is the total-variation distance (half the L1 distance, 0-1) between its
histograms and the set's mean histograms: palette (lightness and chroma, weighted 0.6) and texture (0.4).
The score is 1 minus the mean distance: 1 when every view has the same palette and texture, falling as views
drift. Distances to the mean rather than between every pair: the same ranking, in time linear in the number of
images (a catalogue job's style holds tens of thousands). An outlier is an image whose distance is both far
beyond the set's spread (median + 3 robust standard deviations, from the median absolute deviation) and
large in itself (over `OUTLIER_FLOOR`), so a very uniform set flags nothing for noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LIGHTNESS_BINS = 8
CHROMA_BINS = 6
"""Per axis (a*, b*): 6 × 6 chroma bins."""
CHROMA_RANGE = 60.0
"""a* and b* are binned over [-60, 60], clipped."""
TEXTURE_BINS = 8
PALETTE = slice(0, LIGHTNESS_BINS + CHROMA_BINS**2)
"""A signature's lightness and chroma bins; its texture bins follow (`workers.look`)."""
TEXTURE = slice(PALETTE.stop, PALETTE.stop + TEXTURE_BINS)
PALETTE_WEIGHT = 0.6
OUTLIER_FLOOR = 0.15
MIN_IMAGES = 3
"""Fewer images say nothing about a set's consistency."""


@dataclass(frozen=True)
class Consistency:
    score: float
    distances: list[float]
    """Each image's distance to the set, in the order given."""
    outliers: list[int]
    """Indexes of the images that stray from the set."""
    palette: float | None = None
    """With a style pack's palette: the images' mean share of colour on it (`palette_match`)."""


def consistency(looks: Sequence[Sequence[float]], palette: Sequence[str] | None = None) -> Consistency | None:
    """The set's score, each image's distance and the outliers, and with a `palette` how much of the set's
    colour lies on it; None for fewer than `MIN_IMAGES` images."""
    if len(looks) < MIN_IMAGES:
        return None
    signatures = np.asarray(looks, dtype=np.float64)
    mean = signatures.mean(axis=0)
    colour = 0.5 * np.abs(signatures[:, PALETTE] - mean[PALETTE]).sum(axis=1) / 2  # two histograms, each sums to 1
    texture = 0.5 * np.abs(signatures[:, TEXTURE] - mean[TEXTURE]).sum(axis=1)
    distances = PALETTE_WEIGHT * colour + (1 - PALETTE_WEIGHT) * texture
    median = float(np.median(distances))
    spread = 1.4826 * float(np.median(np.abs(distances - median)))
    outliers = [i for i, d in enumerate(distances) if d > median + 3 * spread and d > OUTLIER_FLOOR]
    on_palette = None if not palette else round(float(np.mean([palette_match(s, palette) for s in looks])), 4)
    return Consistency(
        round(1.0 - float(distances.mean()), 4), [round(float(d), 4) for d in distances], outliers, on_palette
    )


def palette_match(look: Sequence[float], palette: Sequence[str]) -> float:
    """The share (0-1) of an image's colour that lies on `palette` (#rrggbb colours): its chroma mass in the
    2 × 2 a*, b* bins whose centres surround each palette colour (a bin is 20 units of a* or b*: colours within
    about 20 units count). Chroma only: lightness changes with the light, not with the materials."""
    chroma = np.asarray(look[LIGHTNESS_BINS : PALETTE.stop], dtype=np.float64).reshape(CHROMA_BINS, CHROMA_BINS)
    covered = np.zeros_like(chroma, dtype=bool)
    for a, b in _bins_around(palette):
        covered[a, b] = True
    return min(1.0, round(float(chroma[covered].sum()), 4))  # the stored bins are rounded


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0-1, as OpenCV's float conversion gives it to the pixels `workers.look`
    bins (the API reads palettes without loading OpenCV): linearised sRGB, to XYZ, to L*a*b*."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_SRGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_D65 = np.array([0.950456, 1.0, 1.088754])


def _bins_around(colours: Sequence[str]) -> list[tuple[slice, slice]]:
    """For each sRGB colour, the a* and b* bins (as `workers.look` bins pixels) whose centres surround it."""
    lab = srgb_to_lab(np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in colours]) / 255.0)
    width = 2 * CHROMA_RANGE / CHROMA_BINS

    def around(value: float) -> slice:
        low = int(np.floor((np.clip(value, -CHROMA_RANGE, CHROMA_RANGE) + CHROMA_RANGE) / width - 0.5))
        return slice(max(0, low), max(0, low) + 2) if low < CHROMA_BINS - 1 else slice(CHROMA_BINS - 1, CHROMA_BINS)

    return [(around(a), around(b)) for _, a, b in lab]
