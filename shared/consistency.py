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


def consistency(looks: Sequence[Sequence[float]]) -> Consistency | None:
    """The set's score, each image's distance and the outliers; None for fewer than `MIN_IMAGES` images."""
    if len(looks) < MIN_IMAGES:
        return None
    signatures = np.asarray(looks, dtype=np.float64)
    mean = signatures.mean(axis=0)
    palette = 0.5 * np.abs(signatures[:, PALETTE] - mean[PALETTE]).sum(axis=1) / 2  # two histograms, each sums to 1
    texture = 0.5 * np.abs(signatures[:, TEXTURE] - mean[TEXTURE]).sum(axis=1)
    distances = PALETTE_WEIGHT * palette + (1 - PALETTE_WEIGHT) * texture
    median = float(np.median(distances))
    spread = 1.4826 * float(np.median(np.abs(distances - median)))
    outliers = [i for i, d in enumerate(distances) if d > median + 3 * spread and d > OUTLIER_FLOOR]
    return Consistency(round(1.0 - float(distances.mean()), 4), [round(float(d), 4) for d in distances], outliers)
