"""Synthetic floor-plan drawings as varied as real ones, each with the footprint it shows and the render the
demo ControlNet should make of it.

A `Layout` is a building's geometry: a footprint of one to three rectangles (a box, an L, a T, a U, at any
proportions and place on a sheet of any aspect), split into rooms by walls with door openings. `draw` turns
it into a drawing in one of `STYLES`, the ways plans reach a render farm: thin lines, filled (poché) walls,
colour plans with furniture, plans with room labels and dimension chains, scans, and phone photos of a
pencil sketch. `target` is what the drawing should come out as: paper outside, each room coloured by the
corner of the footprint it lies in, walls dark, so the target follows from the drawing alone whatever its
style. `HELD_OUT` styles never appear in training: the demo is measured on them.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from workers.preprocessors.resize import fit_and_pad

PAPER = (235, 235, 230)
"""The target's background: what a render shows outside the building."""
ROOMS = [(170, 120, 70), (200, 180, 140), (120, 140, 160), (150, 170, 120)]
"""The target's room colours, by the corner of the footprint a room lies in (top left, top right, ...)."""
WALL = (40, 40, 40)
TRAINED = ("line", "filled", "colour", "labelled", "scan", "sketch")
HELD_OUT = ("hollow", "hatched", "blueprint")
"""Drawing styles the demo ControlNet never sees in training: double-line walls, hatched walls, white on blue."""
STYLES = TRAINED + HELD_OUT
_LABELS = ["LIVING", "KITCHEN", "BED 1", "BED 2", "BATH", "HALL", "STUDY", "DINING", "WC", "STORE"]


@dataclass(frozen=True)
class Layout:
    """A building on a sheet: masks of its footprint and walls at the sheet's pixel size, and its rooms."""

    footprint: np.ndarray
    """bool, height×width: inside the building."""
    walls: np.ndarray
    """bool, height×width: wall, outer and inner, with door openings left out."""
    thickness: int
    split: tuple[int, int]
    """Where the footprint's bounding box is cut into the four corners that colour its rooms."""
    rooms: list[tuple[int, int, int, int]]
    """Rectangles (x0, y0, x1, y1) that the inner walls bound, for labels and furniture."""

    @property
    def size(self) -> tuple[int, int]:
        return self.footprint.shape[1], self.footprint.shape[0]


def layout(rng: random.Random, size: int) -> Layout:
    """A random building on a sheet whose longer side is `size`: any aspect from 1:1 to 3:2, either way up."""
    long, short = size, rng.randint(size * 2 // 3, size)
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    margin = max(4, size // 16)
    x0, y0 = margin + rng.randint(0, width // 8), margin + rng.randint(0, height // 8)
    x1, y1 = width - margin - rng.randint(0, width // 8), height - margin - rng.randint(0, height // 8)
    footprint = np.zeros((height, width), bool)
    footprint[y0:y1, x0:x1] = True
    bw, bh = x1 - x0, y1 - y0
    shape = rng.choice(["box", "L", "L", "T", "U"])
    cut_w, cut_h = rng.randint(bw // 4, bw // 2), rng.randint(bh // 4, bh // 2)
    if shape == "L":  # one corner cut away
        cx = x0 if rng.random() < 0.5 else x1 - cut_w
        cy = y0 if rng.random() < 0.5 else y1 - cut_h
        footprint[cy : cy + cut_h, cx : cx + cut_w] = False
    elif shape == "T":  # both corners of one side
        cy = y0 if rng.random() < 0.5 else y1 - cut_h
        side = min(cut_w, bw // 3)
        footprint[cy : cy + cut_h, x0 : x0 + side] = False
        footprint[cy : cy + cut_h, x1 - side : x1] = False
    elif shape == "U":  # a bite out of the middle of one side
        cy = y0 if rng.random() < 0.5 else y1 - cut_h
        middle = x0 + bw // 2
        footprint[cy : cy + cut_h, middle - cut_w // 2 : middle + cut_w // 2] = False
    if rng.random() < 0.5:  # as often the other way round
        footprint = _transpose_within(footprint, (x0, y0, x1, y1))
    thickness = rng.randint(max(2, size // 64), max(3, size // 28))
    xs = rng.randint(x0 + bw // 3, x1 - bw // 3)
    ys = rng.randint(y0 + bh // 3, y1 - bh // 3)
    inner = np.zeros_like(footprint)
    half = max(1, thickness // 2)
    inner[:, xs - half : xs + half + 1] = True
    inner[ys - half : ys + half + 1, :] = True
    rooms = [(x0, y0, xs, ys), (xs, y0, x1, ys), (x0, ys, xs, y1), (xs, ys, x1, y1)]
    for rx0, ry0, rx1, ry1 in rooms:  # a door in each inner wall a room has
        door = max(6, min(rx1 - rx0, ry1 - ry0) // 3)
        if rx1 - rx0 > door + 2 * thickness:
            dx = rng.randint(rx0 + thickness, rx1 - door - thickness)
            inner[ys - half - 1 : ys + half + 2, dx : dx + door] = False
        if ry1 - ry0 > door + 2 * thickness:
            dy = rng.randint(ry0 + thickness, ry1 - door - thickness)
            inner[dy : dy + door, xs - half - 1 : xs + half + 2] = False
    kernel = np.ones((2 * thickness + 1, 2 * thickness + 1), np.uint8)
    outer = footprint & ~(cv2.erode(footprint.astype(np.uint8), kernel, borderValue=0) > 0)
    return Layout(footprint, outer | (inner & footprint), thickness, (xs, ys), rooms)


def blank(plan: Layout) -> Layout:
    """`plan`'s sheet with nothing on it: an empty page, whose render should show paper and no building."""
    empty = np.zeros_like(plan.footprint)
    return Layout(empty, empty.copy(), plan.thickness, plan.split, [])


def _transpose_within(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The shape inside `box` mirrored on both axes: a cut at the top left lands at the bottom right."""
    x0, y0, x1, y1 = box
    out = mask.copy()
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1][::-1, ::-1]
    return out


def target(plan: Layout) -> Image.Image:
    """What the demo should render of `plan`: rooms coloured by their corner, walls dark, paper outside."""
    width, height = plan.size
    xs, ys = plan.split
    ys_grid, xs_grid = np.mgrid[0:height, 0:width]
    corner = (ys_grid >= ys).astype(int) * 2 + (xs_grid >= xs).astype(int)
    picture = np.empty((height, width, 3), np.uint8)
    picture[:] = PAPER
    for index, colour in enumerate(ROOMS):
        picture[plan.footprint & (corner == index)] = colour
    picture[plan.walls] = WALL
    return Image.fromarray(picture)


def draw(plan: Layout, style: str, rng: random.Random) -> Image.Image:
    """`plan` drawn in `style` (one of `STYLES`), at the sheet's size."""
    width, height = plan.size
    if style == "blueprint":
        sheet = _sheet(plan, (30, 70, 140))
        sheet[_thin(plan)] = (235, 240, 255)
        return Image.fromarray(sheet)
    sheet = _sheet(plan, (255, 255, 255))
    if style == "line":
        sheet[_thin(plan)] = (0, 0, 0)
    elif style == "filled":
        sheet[plan.walls] = rng.choice([(0, 0, 0), (60, 60, 60), (90, 90, 90)])
    elif style == "hollow":
        sheet[_outline(plan.walls)] = (0, 0, 0)
    elif style == "hatched":
        stripes = (np.add.outer(np.arange(height), np.arange(width)) // 2) % 3 == 0
        sheet[plan.walls & stripes] = (0, 0, 0)
        sheet[_outline(plan.walls)] = (0, 0, 0)
    elif style == "colour":
        for room in plan.rooms:
            _fill_room(sheet, plan, room, tuple(rng.randint(190, 250) for _ in range(3)))
        picture = Image.fromarray(sheet)
        _furniture(picture, plan, rng)
        sheet = np.asarray(picture).copy()
        sheet[plan.walls] = (30, 30, 30)
    elif style == "labelled":
        sheet[plan.walls] = (0, 0, 0)
        picture = Image.fromarray(sheet)
        _labels(picture, plan, rng)
        return picture
    elif style in ("scan", "sketch"):
        return _photographed(plan, style, rng)
    else:
        raise ValueError(f"unknown drawing style {style!r}; styles: {', '.join(STYLES)}")
    return Image.fromarray(sheet)


def _sheet(plan: Layout, colour: tuple[int, int, int]) -> np.ndarray:
    width, height = plan.size
    sheet = np.empty((height, width, 3), np.uint8)
    sheet[:] = colour
    return sheet


def _outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel rim of `mask`: walls drawn as their two faces."""
    eroded = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0) > 0
    return mask & ~eroded


def _thin(plan: Layout) -> np.ndarray:
    """The walls' cores, a pixel or two wide: walls drawn as single lines."""
    side = max(1, plan.thickness - 1)
    return cv2.erode(plan.walls.astype(np.uint8), np.ones((side, side), np.uint8)) > 0


def _fill_room(sheet: np.ndarray, plan: Layout, room: tuple[int, int, int, int], colour: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = room
    inside = np.zeros_like(plan.footprint)
    inside[y0:y1, x0:x1] = True
    sheet[inside & plan.footprint] = colour


def _furniture(picture: Image.Image, plan: Layout, rng: random.Random) -> None:
    """A bed, a table or a sofa in each room, drawn thin as furniture is: the render must not make rooms of it."""
    pen = ImageDraw.Draw(picture)
    for x0, y0, x1, y1 in plan.rooms:
        w, h = x1 - x0, y1 - y0
        if w < 20 or h < 20:
            continue
        cx, cy = rng.randint(x0 + w // 3, x1 - w // 3), rng.randint(y0 + h // 3, y1 - h // 3)
        if not plan.footprint[cy, cx]:
            continue
        r = max(3, min(w, h) // 6)
        if rng.random() < 0.5:
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(90, 90, 90), width=1)
        else:
            pen.rectangle((cx - r, cy - r // 2, cx + r, cy + r // 2), outline=(90, 90, 90), width=1)


def _labels(picture: Image.Image, plan: Layout, rng: random.Random) -> None:
    """Room names inside and a dimension chain along two sides outside, as a drafted plan has."""
    pen = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for x0, y0, x1, y1 in plan.rooms:
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        if plan.footprint[cy, cx]:
            pen.text((cx, cy), rng.choice(_LABELS), fill=(0, 0, 0), font=font, anchor="mm")
    if not plan.footprint.any():  # an empty page: nothing to measure
        return
    ys, xs = np.nonzero(plan.footprint)
    left, top, right, bottom = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    gap = max(3, plan.thickness)
    line_y, line_x = max(1, top - gap), min(picture.width - 2, right + gap)
    pen.line((left, line_y, right, line_y), fill=(80, 80, 80))
    pen.line((line_x, top, line_x, bottom), fill=(80, 80, 80))
    for x in (left, plan.split[0], right):
        pen.line((x, line_y - 2, x, line_y + 2), fill=(80, 80, 80))
    for y in (top, plan.split[1], bottom):
        pen.line((line_x - 2, y, line_x + 2, y), fill=(80, 80, 80))
    pen.text(
        ((left + right) // 2, line_y - 1),
        f"{rng.randint(6, 18)}.{rng.randint(0, 9)}0",
        fill=(0, 0, 0),
        font=font,
        anchor="mb",
    )


def _photographed(plan: Layout, style: str, rng: random.Random) -> Image.Image:
    """A scan (grey paper, a slight tilt, blur, noise, JPEG) or a phone photo of a pencil sketch (wobbly grey
    strokes, light falling off across the page, a larger tilt, more noise)."""
    width, height = plan.size
    sheet = _sheet(plan, (255, 255, 255))
    if style == "sketch":
        wobble = cv2.GaussianBlur(_noise(rng).normal(0, 1, (height, width)).astype(np.float32), (0, 0), 6)
        shift = np.clip(np.round(wobble * 8), -2, 2).astype(int)
        rows, cols = np.nonzero(_thin(plan))
        rows = np.clip(rows + shift[rows, cols], 0, height - 1)
        sheet[rows, cols] = rng.randint(60, 110)
        sheet = cv2.GaussianBlur(sheet, (3, 3), 0)
        ramp = np.linspace(rng.uniform(0.65, 0.85), 1.0, width)[None, :, None]
        sheet = (sheet * (ramp if rng.random() < 0.5 else ramp[:, ::-1])).astype(np.uint8)
        sheet = (sheet * np.array([1.0, 0.97, 0.9])).astype(np.uint8)  # warm indoor light
        tilt, noise = rng.uniform(-6, 6), 10.0
    else:
        sheet[plan.walls] = (0, 0, 0)
        sheet = (sheet * 0.9 + 15).astype(np.uint8)
        tilt, noise = rng.uniform(-2, 2), 5.0
    paper = tuple(int(v) for v in sheet[0, 0])
    turn = cv2.getRotationMatrix2D((width / 2, height / 2), tilt, 1.0)
    sheet = cv2.warpAffine(sheet, turn, (width, height), borderValue=paper)
    grain = _noise(rng).normal(0, noise, sheet.shape)
    sheet = np.clip(sheet + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, "JPEG", quality=rng.randint(40, 80))
    return Image.open(buffer).convert("RGB")


def _noise(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.randint(0, 2**31))


def fitted_target(plan: Layout, size: int) -> Image.Image:
    """`target(plan)` placed as the engine places the drawing in a size×size render: scaled, centred, padded."""
    return Image.fromarray(fit_and_pad(np.asarray(target(plan)), size, size, fill=PAPER))


def fitted_footprint(plan: Layout, size: int) -> np.ndarray:
    """The footprint where a size×size render of the drawing shows it."""
    return fit_and_pad(plan.footprint.astype(np.uint8) * 255, size, size) > 127


def built(render: np.ndarray) -> np.ndarray:
    """Where a render shows building rather than paper: its colour far from the paper's."""
    return np.abs(render.astype(int) - np.array(PAPER)).sum(axis=2) > 60


def agreement(render: np.ndarray, footprint: np.ndarray) -> float:
    """How well a render's building matches a footprint: intersection over union of the two areas."""
    shown = built(render)
    return float((shown & footprint).sum() / max((shown | footprint).sum(), 1))
