"""An upscale's image assembled from its tiles: overlaps blended, seams scored, encoded once.

The image is built band by band (one row of tiles at a time): a row's tiles are read one after another and
added, weighted, into a float band the height of a tile; the rows no later tile reaches are then final and
rounded into the output. So an assembly holds the output, one band and one tile, whatever the image's size,
and never touches a GPU. Tiles come in OpenCV's BGR order, the order it encodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from shared.errors import PermanentError
from shared.tiles import SUFFIXES, Grid

ENCODINGS: dict[str, list[int]] = {
    "png": [cv2.IMWRITE_PNG_COMPRESSION, 1],  # a quarter of level 6's time for ~10% more bytes
    "tiff16": [],
    "jpeg": [cv2.IMWRITE_JPEG_QUALITY, 95],
}
SEAM_BAND_ROWS = 64
"""Rows the seam score differentiates at once: bounds its scratch memory on a 6K image to a few MiB."""


@dataclass(frozen=True)
class Assembled:
    data: bytes
    """The encoded image."""
    preview: np.ndarray
    """The image shrunk to at most 512 px at 8 bits (BGR), for its thumbnail."""
    seam: float


def blend(grid: Grid, read: Callable[[int], np.ndarray], deep: bool = False) -> np.ndarray:
    """The image from its tiles (`read(index)`: a tile as uint8 BGR, `tile`×`tile`): each pixel the weighted
    sum of the tiles covering it (`Grid.ramps`), rounded to uint8, or to uint16 when `deep`."""
    xs, ys, side = grid.xs, grid.ys, grid.tile
    across, down = grid.ramps()
    out = np.empty((grid.height, grid.width, 3), np.uint16 if deep else np.uint8)
    band = np.zeros((side, grid.width, 3), np.float32)  # rows [ys[row], ys[row] + side) of the image
    for row, top in enumerate(ys):
        for column, left in enumerate(xs):
            tile = read(row * len(xs) + column)
            if tile.shape != (side, side, 3):
                index = row * len(xs) + column
                raise PermanentError(f"tile {index} is {tile.shape[1]}×{tile.shape[0]}, not {side}×{side}")
            weight = np.outer(down[row], across[column]).astype(np.float32)
            band[:, left : left + side] += tile * weight[..., None]
        done = (ys[row + 1] if row + 1 < len(ys) else grid.height) - top  # rows no later tile reaches
        final = band[:done]
        if deep:
            final *= 257.0
        out[top : top + done] = np.clip(np.rint(final, out=final), 0, 65535 if deep else 255, out=final)
        band[: side - done] = band[done:]
        band[side - done :] = 0
    return out


def seam_score(image: np.ndarray, grid: Grid) -> float:
    """Mean gradient magnitude across the lines where tiles start or end, over the mean across all pixel
    pairs: about 1 where no seam shows, well above it where tiles step. Computed in bands of rows."""
    columns, rows = grid.edges()
    edge_sum = all_sum = 0.0
    edge_count = all_count = 0
    levels = 257.0 if image.dtype == np.uint16 else 1.0  # gradients in 8-bit levels whatever the depth
    for top in range(0, image.shape[0], SEAM_BAND_ROWS):
        band = image[top : top + SEAM_BAND_ROWS + 1].astype(np.float32) / levels  # one row more: the step below
        across = np.abs(np.diff(band[:-1] if len(band) > SEAM_BAND_ROWS else band, axis=1))
        down = np.abs(np.diff(band, axis=0))
        all_sum += float(across.sum() + down.sum())
        all_count += across.size + down.size
        if columns:
            edge_sum += float(across[:, [c - 1 for c in columns]].sum())
            edge_count += across[:, [c - 1 for c in columns]].size
        inside = [r - 1 - top for r in rows if top < r <= top + len(down)]
        if inside:
            edge_sum += float(down[inside].sum())
            edge_count += down[inside].size
    epsilon = 1e-3  # a flat image has no gradient anywhere: no seam either
    return (edge_sum / max(edge_count, 1) + epsilon) / (all_sum / max(all_count, 1) + epsilon)


def assemble(grid: Grid, read: Callable[[int], np.ndarray], format: str) -> Assembled:
    """Blend, score and encode an image in `format` (png, tiff16, jpeg)."""
    image = blend(grid, read, deep=format == "tiff16")
    seam = seam_score(image, grid)
    ok, data = cv2.imencode(SUFFIXES[format], image, ENCODINGS[format])
    if not ok:
        raise PermanentError(f"could not encode the assembled image as {format}")
    preview = _preview(image)
    if preview.dtype == np.uint16:
        preview = np.rint(preview / 257.0).astype(np.uint8)
    return Assembled(data.tobytes(), preview, seam)


def _preview(image: np.ndarray, side: int = 512) -> np.ndarray:
    """The image shrunk (area averaging) so its thumbnail is made from a small copy, not the whole."""
    scale = side / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
