"""Geometry adherence: how well a render's edges follow its plan's control map.

A ControlNet render that follows its plan has its walls where the map has edges. The score is the F-score of
the two edge sets matched within a few pixels (the boundary F-measure of segmentation benchmarks): precision
is the share of the render's edges that lie near an edge of the map, recall the share of the map's edges that
the render reproduces nearby. Both are traced by the same adaptive Canny as a Canny control map (a map that
is already an edge map traces to itself, within a pixel). 1 is a render whose edges are exactly the plan's; a
render of another plan, or of no plan, scores low; furniture, texture and light add edges the plan lacks and
cost precision, so scores compare renders of one job and profile rather than read as an absolute grade.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from workers.preprocessors.canny import AdaptiveCanny

TOLERANCE_PX = 3
"""How far, in pixels of the render, an edge may lie from its counterpart and still match (at 512², under 1%)."""
_TRACE = AdaptiveCanny(sigma=0.33, blur=5)


def adherence(image: Image.Image, control_map: Image.Image, tolerance_px: float = TOLERANCE_PX) -> float:
    """F-score (0-1) of `image`'s edges against those of `control_map`, at the image's size."""
    width, height = image.size
    ours, theirs = _edges(image, width, height), _edges(control_map, width, height)
    if not ours.any() or not theirs.any():
        return 0.0
    precision = float(np.mean(_distance_to(theirs)[ours] <= tolerance_px))
    recall = float(np.mean(_distance_to(ours)[theirs] <= tolerance_px))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _edges(image: Image.Image, width: int, height: int) -> np.ndarray:
    return np.asarray(_TRACE(image, width, height).convert("L")) > 0


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the nearest edge pixel."""
    return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, 3)
