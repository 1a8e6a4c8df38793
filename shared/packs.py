"""Style packs stored by name in the farm's storage (`styles/NAME.json`): a style's prompts, its LoRA and its
mood board, pinned by content hash and copied beside the plans, so any job can name the pack and gets the
version that was stored when it was submitted (the job keeps its own copy)."""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from shared.errors import InvalidInput
from shared.loras import pin_lora
from shared.plans import load_plan, stage_plans
from shared.spec import NAME_PATTERN, Style
from shared.storage import Storage, Storages
from shared.styles import CATALOG

PREFIX = "styles/"
_NAME = re.compile(NAME_PATTERN)
MAX_PACK_BYTES = 1024 * 1024


def pin_style(style: Style, storages: Storages, farm: bool, where: str) -> Style:
    """`style` with its LoRA and mood board read, checked and pinned by content hash (copied into the farm's
    storage for a `farm`): the hashes are part of the style's digest, so a pack changed later never overwrites
    earlier images, and every worker reads the same bytes."""
    if not style.packed:
        return style
    loras = [pin_lora(lora, storages, farm, f"{where}.loras.{i}") for i, lora in enumerate(style.loras)]
    reference = style.reference
    if reference is not None:
        images = [load_plan(image, storages)[0] for image in reference.images]
        if farm:
            images = stage_plans(images, storages)
        pinned = {"images": [i.url for i in images], "images_sha256": [i.digest for i in images]}
        if reference.images_sha256 not in (None, pinned["images_sha256"]):
            raise InvalidInput(f"{where}.reference: its images changed since the style was saved")
        reference = reference.model_copy(update=pinned)
    return style.model_copy(update={"loras": loras, "reference": reference})


def store_pack(storages: Storages, style: Style) -> Style:
    """Store `style` as a pack in the farm's storage under its name (replacing an earlier pack of that name for
    later jobs), its LoRA and mood board checked, pinned and copied beside the plans; the pack as stored."""
    if style.name in CATALOG:
        raise InvalidInput(f"{style.name!r} is a built-in style; give the pack another name")
    stored = pin_style(style, storages, True, style.name)
    data = stored.model_dump_json(indent=1, exclude_none=True).encode()
    storages.open().put(f"{PREFIX}{style.name}.json", data, "application/json")
    return stored


def load_pack(storage: Storage, name: str) -> Style | None:
    """The pack stored under `name`; None when there is none (or `name` could not name one)."""
    if not _NAME.fullmatch(name):
        return None
    try:
        data = storage.get(f"{PREFIX}{name}.json", limit=MAX_PACK_BYTES)
    except FileNotFoundError:
        return None
    try:
        return Style.model_validate(json.loads(data))
    except (ValueError, ValidationError) as error:
        raise InvalidInput(f"stored style pack {name!r} is damaged: {str(error).splitlines()[0]}") from None


def pack_names(storage: Storage) -> list[str]:
    return sorted(
        key.removeprefix(PREFIX).removesuffix(".json") for key in storage.list(PREFIX) if key.endswith(".json")
    )
