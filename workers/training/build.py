"""`archfarm dataset build`: training pairs from a studio's own images, control maps made by archfarm's own
preprocessors, so a ControlNet is trained on exactly the maps the farm will give it when rendering.

Each image is fitted into a square of the dataset's resolution (padded, as the engine pads a plan) and its
map made from it at that size; both are written as PNGs with one `metadata.jsonl` row per pair.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shared.config import Settings
from shared.errors import InvalidInput, PlanError
from shared.images import decode_image
from shared.plans import load_plan
from shared.spec import CannyControl, ControlUnit, DepthControl, PlanDepthControl
from shared.storage import Storages
from workers.engine.models import pick_device
from workers.preprocessors import ControlMaps
from workers.preprocessors.resize import fit_and_pad
from workers.training.dataset import METADATA

CONTROLS = ("canny", "plan-depth", "depth")
DEFAULT_PROMPT = "an architectural visualisation of {name}"


@dataclass(frozen=True)
class Built:
    pairs: int
    skipped: list[str]
    """One line per image left out, with the reason."""
    uncaptioned: int
    """Images without a row in the captions file, given the template's prompt instead."""


def read_captions(path: Path) -> dict[str, str]:
    """A CSV with columns `image,text`: the image's file name (or stem) and its prompt."""
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InvalidInput(f"{path}: unreadable captions ({error})") from None
    if rows and not {"image", "text"} <= set(rows[0]):
        raise InvalidInput(f"{path}: captions need the columns image,text")
    return {row["image"]: row["text"] for row in rows if row.get("image")}


def build(
    images: Sequence[str],
    control: str,
    out: str,
    settings: Settings,
    *,
    resolution: int = 512,
    prompt: str = DEFAULT_PROMPT,
    captions: dict[str, str] | None = None,
    depth_model: str | None = None,
    on_pair: Callable[[str], None] | None = None,
) -> Built:
    """Write the pairs of `images` under `out` (a folder or s3:// prefix); an unreadable image is skipped."""
    if control not in CONTROLS:
        raise InvalidInput(f"--control {control!r}: one of {', '.join(CONTROLS)}")
    if resolution % 8 or not 64 <= resolution <= 2048:
        raise InvalidInput(f"--resolution {resolution}: a multiple of 8 from 64 to 2048")
    if "{" in prompt.replace("{name}", ""):
        raise InvalidInput(f"--prompt {prompt!r}: the only placeholder is {{name}}")
    unit = _unit(control, depth_model)
    storages = Storages(settings)
    device = pick_device(settings.device)
    maps = ControlMaps(None, settings.models_dir, device, read=storages.read, max_pixels=settings.max_image_pixels)
    storage = storages.open(out)
    rows, skipped, names = [], [], set()
    uncaptioned = 0
    for url in images:
        try:
            plan, data = load_plan(url, storages)
        except (PlanError, InvalidInput) as error:
            skipped.append(str(error))
            continue
        name = plan.name if plan.name not in names else f"{plan.name}-{plan.digest[:8]}"
        names.add(name)
        image = decode_image(data, url, max_pixels=settings.max_image_pixels).convert("RGB")
        target = Image.fromarray(fit_and_pad(np.asarray(image), resolution, resolution, fill=255))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty map is this image's business; `dataset check` has the say
            conditioning = maps.get(
                unit, plan.digest, functools.partial(_same, image), "sd15", resolution, resolution, name
            )
        text = _caption(captions, url, plan.name)
        if text is None:
            uncaptioned += captions is not None
            text = prompt.replace("{name}", plan.name.replace("-", " ").replace("_", " "))
        storage.put(f"images/{name}.png", _png(target), "image/png")
        storage.put(f"conditioning/{name}.png", _png(conditioning), "image/png")
        rows.append({"image": f"images/{name}.png", "conditioning_image": f"conditioning/{name}.png", "text": text})
        if on_pair is not None:
            on_pair(name)
    if not rows:
        raise InvalidInput("no image could be read: nothing written")
    storage.put(METADATA, "".join(json.dumps(row) + "\n" for row in rows).encode(), "application/jsonl")
    return Built(len(rows), skipped, uncaptioned)


def _same(image: Image.Image) -> Image.Image:
    return image


def _unit(control: str, depth_model: str | None) -> ControlUnit:
    if control == "canny":
        return CannyControl(kind="canny")
    if control == "plan-depth":
        return PlanDepthControl(kind="plan-depth")
    return DepthControl(kind="depth", depth_model=depth_model)


def _caption(captions: dict[str, str] | None, url: str, stem: str) -> str | None:
    if captions is None:
        return None
    return captions.get(Path(url).name) or captions.get(stem)


def _png(image: Image.Image) -> bytes:
    data = io.BytesIO()
    image.save(data, format="PNG")
    return data.getvalue()
