"""Monocular depth maps from a DPT model (`Intel/dpt-large` by default), for a depth ControlNet.

Loading a DPT costs seconds against tens of milliseconds per image, so a worker loads each model once and
keeps it: `depth_estimator` hands out one shared estimator per model and device. On a floor plan a
monocular model sees paper with ink on it; `PlanDepth` reads depth from the plan's geometry instead, and
this is for photographs, renders and sketches in perspective.
"""

from __future__ import annotations

import copy
import threading

import cv2
import numpy as np
import torch
from PIL import Image
from transformers import DPTForDepthEstimation, DPTImageProcessorPil

from shared import hub
from shared.errors import ModelError
from workers.preprocessors.resize import fit_and_pad

DEFAULT_MODEL = "Intel/dpt-large"


class DepthEstimator:
    """Depth of an image as an RGB map, near bright and far dark, the convention of SD depth ControlNets.

    `resolution` is the side of the square the model sees: the image is stretched to it, as dpt-large's
    published preprocessing does (its ViT takes square inputs only), and the prediction is stretched back
    to the image's own aspect. 384 is what dpt-large was trained at; it must be a multiple of the model's
    patch size. The PIL image processor is used whether or not torchvision is installed, so the same
    image gives the same map on every machine.
    """

    def __init__(self, location: str, device: torch.device, resolution: int = 384) -> None:
        """Load the model at `location` (a local folder or a hub id) onto `device`; ModelError if impossible,
        at once for a hub model neither cached nor downloadable now (the hub library would retry, or wait)."""
        unloadable = hub.unloadable(location, "config.json")
        if unloadable is not None:
            raise ModelError(f"cannot load depth model {location!r}: {unloadable}")
        try:
            model = DPTForDepthEstimation.from_pretrained(location)
            processor = DPTImageProcessorPil.from_pretrained(location)
        # Missing folders and hub misses are OSError; a folder holding another kind of model is ValueError.
        except (OSError, ValueError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelError(f"cannot load depth model {location!r}: {reason}") from error
        self.location = location
        self.device = device
        self.model = model.to(device).eval()
        self.processor = processor
        self.resolution = self._checked(resolution)

    def at_resolution(self, resolution: int) -> DepthEstimator:
        """An estimator that shares this one's loaded model but sees images at `resolution`."""
        other = copy.copy(self)
        other.resolution = self._checked(resolution)
        return other

    def _checked(self, resolution: int) -> int:
        patch = self.model.config.patch_size
        if not isinstance(resolution, int) or resolution < patch or resolution % patch:
            raise ValueError(f"resolution must be a positive multiple of {patch} (the patch size), got {resolution!r}")
        return resolution

    def __call__(self, image: Image.Image, width: int, height: int) -> Image.Image:
        """The depth map of `image`, RGB and exactly width×height, fitted without distortion and padded black."""
        side = self.resolution
        # Size and aspect handling are fixed here, not taken from the model folder's processor config.
        inputs = self.processor(
            images=image.convert("RGB"),
            size={"height": side, "width": side},
            keep_aspect_ratio=False,
            ensure_multiple_of=1,
            return_tensors="pt",
        )
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        with torch.inference_mode():
            predicted = self.model(pixel_values=pixels).predicted_depth[0]
        # DPT predicts relative inverse depth: larger is nearer, already the bright-is-near convention.
        depth = predicted.float().cpu().numpy()
        cols, rows = image.size
        scale = side / max(cols, rows)
        undistorted = (max(1, round(cols * scale)), max(1, round(rows * scale)))
        depth = cv2.resize(depth, undistorted, interpolation=cv2.INTER_AREA)
        return Image.fromarray(fit_and_pad(_to_bytes(depth), width, height, fill=0)).convert("RGB")


def _to_bytes(depth: np.ndarray) -> np.ndarray:
    """`depth` stretched to 0..255; all zeros where it is flat (or not finite), which carries no depth cue."""
    low, high = float(depth.min()), float(depth.max())
    span = high - low
    # Relative: an untrained model's outputs may all be around 1e-8, and are still a usable map.
    if not span > 1e-6 * max(abs(low), abs(high)):
        return np.zeros(depth.shape, np.uint8)
    return np.rint((depth - low) * (255.0 / span)).astype(np.uint8)


_estimators: dict[tuple[str, torch.device, int], DepthEstimator] = {}
_estimators_lock = threading.Lock()


def depth_estimator(location: str, device: torch.device, resolution: int = 384) -> DepthEstimator:
    """The process's estimator for these arguments, the same object on every call; loaded on first use.

    The weights do not depend on `resolution`: a second resolution of a loaded model shares it rather than
    loading another copy.
    """
    key = (location, device, resolution)
    with _estimators_lock:
        if key not in _estimators:
            loaded = next((e for (loc, dev, _), e in _estimators.items() if (loc, dev) == (location, device)), None)
            _estimators[key] = loaded.at_resolution(resolution) if loaded else DepthEstimator(*key)
        return _estimators[key]
