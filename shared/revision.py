"""A revision's region: which pixels of an approved image change. White (above mid-grey) in the mask marks
them; submit checks there are some, the worker blends its render in around them (`workers.revision`)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def region(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The mask at `size` (nearest neighbour, so no grey creeps in), True where the image changes."""
    return np.asarray(mask.convert("L").resize(size, Image.Resampling.NEAREST)) > 127
