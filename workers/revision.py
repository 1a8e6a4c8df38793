"""How much of a revision's render each pixel takes: all of it inside the mask's region, then less across a band
of `feather` pixels around it (linearly with the distance), none beyond, where the parent's value stays exactly
as it was, bit for bit.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def weights(changed: np.ndarray, feather: int) -> np.ndarray:
    """Per pixel, the new render's share (0-1): 1 inside the region, falling to 0 across `feather` pixels
    outside it, exactly 0 beyond."""
    if not feather:
        return changed.astype(np.float32)
    distance = cv2.distanceTransform((~changed).astype(np.uint8), cv2.DIST_L2, 5)
    return np.clip(1.0 - distance / (feather + 1), 0.0, 1.0).astype(np.float32)


def composite(parent: Image.Image, render: Image.Image, share: np.ndarray) -> Image.Image:
    """The parent with the render blended in by `share`; where the share is 0 the parent's bytes, unchanged
    (old + 0 × (new - old) is old exactly, in any float)."""
    old = np.asarray(parent.convert("RGB"), np.float32)
    new = np.asarray(render.convert("RGB"), np.float32)
    return Image.fromarray(np.rint(old + (new - old) * share[..., None]).astype(np.uint8))
