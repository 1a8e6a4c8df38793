"""`archfarm maps` and `render --save-maps`: each control unit's map for each plan, as the ControlNets get it.

The maps come from the same `ControlMaps` a worker renders with (render size, padding, parameters), so what
is written is what the engine is given; a nearly empty one is also a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from shared.config import Settings
from shared.images import decode_image
from shared.plans import load_plan
from shared.spec import Profile
from shared.storage import Storages
from workers.engine.models import pick_device
from workers.preprocessors import ControlMaps, emptiness


@dataclass(frozen=True)
class MapFile:
    path: Path
    plan: str
    unit: int
    """1-based, in the profile's order."""
    kind: str
    empty: str | None
    """Why the map is nearly empty, or None."""


def write_maps(plans: list[str], profile: Profile, out_dir: Path, settings: Settings) -> list[MapFile]:
    """`OUT/PLAN/N-KIND.png` for every plan and unit N; plans are checked as at submit (a bad one stops all)."""
    storages = Storages(settings)
    loaded = [load_plan(plan, storages) for plan in plans]
    device = pick_device(settings.device)
    maps = ControlMaps(None, settings.models_dir, device, read=storages.read, max_pixels=settings.max_image_pixels)
    written: list[MapFile] = []
    names: set[str] = set()
    for plan, data in loaded:
        name = plan.name if plan.name not in names else f"{plan.name}-{plan.digest[:8]}"
        names.add(name)
        image = decode_image(data, plan.url, max_pixels=settings.max_image_pixels)
        written += _plan_maps(maps, profile, plan.digest, name, image, out_dir / name)
    return written


def _plan_maps(
    maps: ControlMaps, profile: Profile, digest: str, name: str, image: Image.Image, folder: Path
) -> list[MapFile]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, unit in enumerate(profile.controls, start=1):
        control = maps.get(unit, digest, lambda: image, profile.base, profile.width, profile.height, label=name)
        path = folder / f"{index}-{unit.kind}.png"
        control.save(path)
        written.append(MapFile(path, name, index, unit.kind, emptiness(unit.kind, control)))
    return written
