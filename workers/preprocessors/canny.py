"""Canny edge maps of floor plans, the condition image for a Canny ControlNet.

Fixed thresholds suit one kind of image: 100..200, say, traces black ink on white paper but finds nothing
in a dark, low-contrast scan. `AdaptiveCanny` scales its thresholds with each image's median brightness
instead. On white paper (median 255) that gives about 171..255, which traces ink darker than mid-gray in
full; pale pencil fades, and less blur helps it more than a different sigma does.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from workers.preprocessors.resize import pad_to, resize_to_fit

# Narrowest band between Canny's two thresholds. The median rule alone collapses it at the extremes: a
# near-black image (median 0) would get 0 and 0 and trace every speck of noise as an edge.
_MIN_GAP = 40.0
SUPERSAMPLE = 16
"""Most times the render size a plan is traced at before its edges are pooled down (see `AdaptiveCanny`):
enough to trace a phone photo of a sketch at its own resolution for a 128 px render."""
TRACE_PIXELS = 16_000_000
"""Largest image traced (a 16 MP trace takes ~0.1 s; an 80 MP plan at 512² would take seconds)."""


class AdaptiveCanny:
    """Edges of a plan, white on black, computed at the output size so lines stay one pixel thin.

    The plan is scaled to fit width×height first (an edge map, once resized, blurs and breaks), blurred to
    quiet paper grain and JPEG noise, and traced with thresholds (1 ± sigma) × median; the rest of the
    canvas is padded with black, which a Canny ControlNet reads as "no edge here". Images are expected as
    `shared.images.decode_image` returns them: alpha and 16-bit samples are not handled here.
    """

    def __init__(self, sigma: float = 0.33, blur: int = 5) -> None:
        """`sigma` widens the threshold band round the median; `blur` is an odd Gaussian kernel or 0."""
        if not 0 < sigma <= 1:
            raise ValueError(f"sigma must be in (0, 1], got {sigma!r}")
        if not isinstance(blur, int) or not (blur == 0 or (blur % 2 == 1 and 1 <= blur <= 31)):
            raise ValueError(f"blur must be 0 or an odd kernel size from 1 to 31, got {blur!r}")
        self.sigma = sigma
        self.blur = blur

    def __call__(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """The edge map of `image`, RGB (as ControlNet pipelines take it) and exactly width×height.

        A plan much larger than the render is traced at up to `SUPERSAMPLE` times the render size, and each
        block of the result is kept as an edge if any of its pixels is: shrinking first would average thin
        pencil lines into the paper (a phone photo of a sketch gave 18 edge pixels at 128 px, against 2,931
        at 512), while the edges found at the larger size survive as one-pixel lines."""
        plain = np.asarray(image.convert("L"))
        fitted = resize_to_fit(plain, width, height)
        budget = math.isqrt(TRACE_PIXELS // fitted.size)
        factor = min(SUPERSAMPLE, budget, plain.shape[0] // fitted.shape[0], plain.shape[1] // fitted.shape[1])
        gray = resize_to_fit(plain, fitted.shape[1] * factor, fitted.shape[0] * factor) if factor > 1 else fitted
        if self.blur:
            gray = cv2.GaussianBlur(gray, (self.blur, self.blur), 0)
        lower, upper = self._thresholds(float(np.median(gray)))
        edges = cv2.Canny(gray, lower, upper)
        if edges.shape != fitted.shape:
            edges = np.where(cv2.resize(edges, fitted.shape[::-1], interpolation=cv2.INTER_AREA) > 0, 255, 0)
        return Image.fromarray(pad_to(edges.astype(np.uint8), width, height, fill=0)).convert("RGB")

    def _thresholds(self, median: float) -> tuple[float, float]:
        lower = max(0.0, (1 - self.sigma) * median)
        upper = min(255.0, (1 + self.sigma) * median)
        if upper - lower < _MIN_GAP:
            # Centre the narrowest band on the median, slid back inside 0..255.
            lower = min(max(0.0, median - _MIN_GAP / 2), 255.0 - _MIN_GAP)
            upper = lower + _MIN_GAP
        return lower, upper
