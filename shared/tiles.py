"""An upscale's tiles: where each lies in the enlarged image, its seed, and how overlapping tiles are blended.

Pure geometry, shared by the producer (one task per tile), the workers (a tile's crop) and the assembly. Every
tile is `tile`×`tile` pixels: the tiles of a row or column are spread evenly from one edge to the other, each
overlapping its neighbour by at least `overlap`, so no tile is cut short at an edge (a short tile would be a
new shape to compile and a weaker composition).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np


def positions(length: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along a side of `length` pixels start: the fewest that overlap by at least `overlap`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class Grid:
    """The tiles of an image `width`×`height`, row by row: tile `i` is row `i // columns`, column `i % columns`."""

    width: int
    height: int
    tile: int
    overlap: int

    @property
    def xs(self) -> list[int]:
        return positions(self.width, self.tile, self.overlap)

    @property
    def ys(self) -> list[int]:
        return positions(self.height, self.tile, self.overlap)

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)

    def box(self, index: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile `index` in the enlarged image."""
        xs, ys = self.xs, self.ys
        x, y = xs[index % len(xs)], ys[index // len(xs)]
        return x, y, x + self.tile, y + self.tile

    def ramps(self) -> tuple[np.ndarray, np.ndarray]:
        """Per column and per row of tiles, its blend weight at each pixel of the tile (`ramp` along each axis):
        shape (columns, tile) and (rows, tile). A tile's weight at a pixel is its column's weight times its
        row's, and the weights of the tiles covering any pixel sum to 1."""
        return ramp(self.width, self.xs, self.tile, self.overlap), ramp(self.height, self.ys, self.tile, self.overlap)

    def edges(self) -> tuple[list[int], list[int]]:
        """Columns and rows where a tile starts or ends inside the image: where a seam would show."""
        inner_x = sorted({e for x in self.xs for e in (x, x + self.tile)} - {0, self.width})
        inner_y = sorted({e for y in self.ys for e in (y, y + self.tile)} - {0, self.height})
        return inner_x, inner_y


def ramp(length: int, starts: list[int], tile: int, overlap: int) -> np.ndarray:
    """Each tile's weight along one axis: rising as a raised cosine over `overlap` pixels from an edge it
    shares with a neighbour, flat elsewhere, then divided by the sum over all tiles at each pixel, so they
    partition 1 however the tiles overlap."""
    inside = np.arange(tile, dtype=np.float64)
    rise = 0.5 - 0.5 * np.cos(np.pi * (np.minimum(inside, overlap - 1) + 0.5) / overlap)
    shapes = np.ones((len(starts), tile))
    for i in range(len(starts)):
        if i > 0:
            shapes[i] *= rise
        if i < len(starts) - 1:
            shapes[i] *= rise[::-1]
    total = np.zeros(length)
    for start, shape in zip(starts, shapes, strict=True):
        total[start : start + tile] += shape
    return np.stack([shape / total[start : start + tile] for start, shape in zip(starts, shapes, strict=True)])


def tile_seed(seed: int, index: int) -> int:
    """A tile's own seed, from the image's and the tile's index: tiles of one image never share noise."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big") >> 1


SUFFIXES = {"png": ".png", "tiff16": ".tiff", "jpeg": ".jpg"}
"""An assembled image's file suffix, by its format."""


def tile_key(image: str, index: int) -> str:
    """A tile's PNG, in a folder named after its image (`image`: the image's PNG key)."""
    return f"{image.removesuffix('.png')}/tile-{index:04d}.png"


def image_key(tile: str, format: str) -> str:
    """The key of the image a tile's key belongs to, in `format`."""
    return tile.rsplit("/", 1)[0] + SUFFIXES[format]
