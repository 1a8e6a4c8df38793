"""Synthetic training pairs whose control map decides the target, made offline from a seed.

They show that training works where no real dataset is at hand: the tests' evidence that a ControlNet
learns, `bench/train.py`'s data, and the tiny demo ControlNets (`workers.training.demo`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from workers.training.dataset import METADATA

BOX_PROMPT = "a brown box on paper"
_GROUND, _BOX = (235, 235, 230), (170, 120, 70)  # colours the tiny demo decoder can draw


def box_pair(rng: random.Random, size: int) -> tuple[Image.Image, Image.Image]:
    """A white rectangle on black (the control map) and the same rectangle brown on paper (the target)."""
    mask, target = Image.new("RGB", (size, size)), Image.new("RGB", (size, size), _GROUND)
    x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
    box = (x0, y0, x0 + rng.randint(size // 4, size // 2), y0 + rng.randint(size // 4, size // 2))
    ImageDraw.Draw(mask).rectangle(box, fill=(255, 255, 255))
    ImageDraw.Draw(target).rectangle(box, fill=_BOX)
    return mask, target


def write_boxes(folder: Path, count: int, size: int, seed: int = 0) -> list[dict[str, str]]:
    """A dataset of `count` box pairs under `folder`; returns its metadata rows."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        mask, target = box_pair(rng, size)
        rows.append(write_pair(folder, f"{index:05d}", target, mask, BOX_PROMPT))
    write_metadata(folder, rows)
    return rows


def write_pair(folder: Path, name: str, image: Image.Image, conditioning: Image.Image, text: str) -> dict[str, str]:
    row = {"image": f"images/{name}.png", "conditioning_image": f"conditioning/{name}.png", "text": text}
    for key, picture in (("image", image), ("conditioning_image", conditioning)):
        path = folder / row[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    return row


def write_metadata(folder: Path, rows: list[dict[str, str]]) -> None:
    (folder / METADATA).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
