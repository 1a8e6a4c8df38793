"""Fit an image array into the render's exact size without distorting it.

A ControlNet condition must be exactly the render's size, but plans come in any aspect ratio; stretching
would bend walls and skew rooms, so a plan is scaled by one factor to fit and the rest is padded.
Arrays are H×W (gray) or H×W×C, of a dtype OpenCV resizes (uint8, uint16, float32, float64).
"""

from __future__ import annotations

import cv2
import numpy as np


def fit_and_pad(array: np.ndarray, width: int, height: int, *, fill: int | tuple[int, ...] = 0) -> np.ndarray:
    """`array` scaled to fit inside width×height, centred on a canvas of `fill` of exactly that size."""
    return pad_to(resize_to_fit(array, width, height), width, height, fill=fill)


def resize_to_fit(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """`array` scaled by one factor until it touches width×height from inside; itself if it already does.

    Preprocessors that must not see the padding (an edge detector would find its border) call this, work on
    the result, and pad afterwards with `pad_to`.
    """
    _check_size(width, height)
    rows, cols = array.shape[:2]
    if rows == 0 or cols == 0:
        raise ValueError(f"cannot resize an empty {cols}×{rows} array")
    scale = min(width / cols, height / rows)
    size = (min(width, max(1, round(cols * scale))), min(height, max(1, round(rows * scale))))
    if size == (cols, rows):
        return array
    # INTER_AREA averages when shrinking, so hatching and thin lines don't alias; enlarging, it is blocky
    # where cubic is smooth.
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(array, size, interpolation=interpolation)
    # OpenCV drops a channel axis of length 1; give the caller back the shape it passed.
    return resized.reshape(size[1], size[0], *array.shape[2:])


def pad_to(array: np.ndarray, width: int, height: int, *, fill: int | tuple[int, ...] = 0) -> np.ndarray:
    """A new width×height array of `fill` (a value, or one per channel) with `array`, which must fit, in the
    centre."""
    _check_size(width, height)
    rows, cols = array.shape[:2]
    if cols > width or rows > height:
        raise ValueError(f"a {cols}×{rows} array does not fit in {width}×{height}")
    canvas = np.full((height, width, *array.shape[2:]), fill, dtype=array.dtype)
    top, left = (height - rows) // 2, (width - cols) // 2
    canvas[top : top + rows, left : left + cols] = array
    return canvas


def _check_size(width: int, height: int) -> None:
    for parameter, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{parameter} must be a positive integer, got {value!r}")
