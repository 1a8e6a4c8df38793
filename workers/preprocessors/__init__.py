"""Preprocessors turn a plan into the control map a ControlNet expects, at the render size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from shared.spec import CannyControl, ControlUnit, PlanImageControl
from workers.preprocessors.canny import AdaptiveCanny
from workers.preprocessors.resize import fit_and_pad


def control_map(unit: ControlUnit, plan: Image.Image, width: int, height: int) -> Image.Image:
    """The control image for one unit; its parameters come from the unit's own settings."""
    if isinstance(unit, CannyControl):
        return AdaptiveCanny(sigma=unit.sigma, blur=unit.blur)(plan, width, height)
    if isinstance(unit, PlanImageControl):
        # The plan as it is; padding is white, the colour of the paper around a drawing.
        return Image.fromarray(fit_and_pad(np.asarray(plan.convert("RGB")), width, height, fill=255))
    raise TypeError(f"no preprocessor for control kind {unit.kind!r}")
