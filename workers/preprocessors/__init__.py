"""Preprocessors turn a plan into the control map a ControlNet expects, at the render size.

`ControlMaps` computes each map once per (plan content, preprocessor and version, parameters, size) and
caches it in memory and, on a farm, in shared storage, so every later task, style, seed and worker reuses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.errors import InputError, SubmitWarning
from shared.images import content_hash, decode_image
from shared.registry import default_depth_model
from shared.spec import CannyControl, ControlUnit, DepthControl, ImageControl, PlanDepthControl, PlanImageControl
from shared.storage import Storage, input_errors
from workers.controlmaps import ControlMapCache
from workers.engine.presets import resolve
from workers.preprocessors.canny import AdaptiveCanny
from workers.preprocessors.depth import depth_estimator
from workers.preprocessors.plan_depth import PlanDepth
from workers.preprocessors.resize import fit_and_pad

# Bump a kind's version when its algorithm changes, so maps cached in shared storage are not reused.
VERSIONS = {"canny": 2, "depth": 1, "plan-depth": 1, "none": 1, "image": 1}


class ControlMaps:
    """The control maps of a worker process, cached across tasks."""

    def __init__(
        self,
        storage: Storage | None,
        models_dir: Path,
        device: torch.device,
        read: Callable[[str], bytes],
        max_pixels: int = 80_000_000,
    ) -> None:
        self.cache = ControlMapCache(storage)
        self.models_dir = models_dir
        self.device = device
        self.read = read
        self.max_pixels = max_pixels

    def get(
        self,
        unit: ControlUnit,
        plan_digest: str,
        plan: Callable[[], Image.Image],
        base: str,
        width: int,
        height: int,
        label: str = "plan",
    ) -> Image.Image:
        """The map for `unit`; `plan` decodes the plan image, called only when a map must be computed. A map
        computed nearly empty is a `SubmitWarning` naming `label` (once per map and process)."""
        params = unit.map_parameters()
        source = plan_digest
        if isinstance(unit, DepthControl):
            params["depth_model"] = resolve(unit.depth_model or default_depth_model(base), self.models_dir)
        if isinstance(unit, ImageControl):
            source = unit.image_sha256 or unit.image  # the map itself is the input, not the plan
        key = {
            "source": source,
            "kind": unit.kind,
            "version": VERSIONS[unit.kind],
            "params": params,
            "size": [width, height],
        }
        return self.cache.get(key, lambda: _checked(label, unit.kind, self._compute(unit, plan, params, width, height)))

    def _compute(
        self, unit: ControlUnit, plan: Callable[[], Image.Image], params: dict[str, Any], width: int, height: int
    ) -> Image.Image:
        if isinstance(unit, CannyControl):
            return AdaptiveCanny(**params)(plan(), width, height)
        if isinstance(unit, DepthControl):
            return depth_estimator(params["depth_model"], self.device, unit.resolution)(plan(), width, height)
        if isinstance(unit, PlanDepthControl):
            return PlanDepth(**params)(plan(), width, height)
        if isinstance(unit, PlanImageControl):
            # The plan as it is; padding is white, the colour of the paper around a drawing.
            return _fit(plan(), width, height, fill=255)
        if isinstance(unit, ImageControl):  # the profile's, so every task of the job shares it
            where = f"control image {unit.image}"
            with input_errors(where):
                data = self.read(unit.image)
            if unit.image_sha256 is not None and content_hash(data) != unit.image_sha256:
                raise InputError(f"{where}: changed after the job was submitted")
            with input_errors(where):
                image = decode_image(data, unit.image, max_pixels=self.max_pixels)
            return _fit(image, width, height, fill=0)
        raise TypeError(f"no preprocessor for control kind {unit.kind!r}")


SPARSE_EDGES = 0.005
"""An edge map with fewer edge pixels than this share of the render shows a ControlNet almost nothing (the
example plan gives 10% at 128², a phone photo of a sketch gave 0.1% before edges were traced at full size)."""
FLAT_STD = 2.0
"""Any other map varying by less than this many grey levels is flat: a ControlNet gets no structure from it."""


def emptiness(kind: str, image: Image.Image) -> str | None:
    """Why `image`, a `kind` map, is nearly empty, or None when it is not."""
    pixels = np.asarray(image.convert("L"))
    if kind == "canny":
        edges = int(np.count_nonzero(pixels))
        if edges < SPARSE_EDGES * pixels.size:
            return f"has {edges} edge pixels ({edges / pixels.size:.1%})"
        return None
    spread = float(pixels.std())
    return f"is nearly flat (standard deviation {spread:.1f} grey levels)" if spread < FLAT_STD else None


def _checked(label: str, kind: str, image: Image.Image) -> Image.Image:
    why = emptiness(kind, image)
    if why is not None:
        warnings.warn(
            f"{label}: the {kind} control map at {image.width}×{image.height} {why}: the ControlNet will see almost "
            "nothing; `archfarm maps` shows it (for canny, try `blur: 0`, a lower `sigma` or a larger render)",
            SubmitWarning,
            stacklevel=2,
        )
    return image


def _fit(image: Image.Image, width: int, height: int, fill: int) -> Image.Image:
    return Image.fromarray(fit_and_pad(np.asarray(image.convert("RGB")), width, height, fill=fill))
