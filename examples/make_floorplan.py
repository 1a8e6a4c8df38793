"""Draw a small synthetic floor plan, so examples and tests need no real (and copyrighted) plan.

Usage: python examples/make_floorplan.py [OUT]   (default: examples/floorplan.png)

The drawing is fixed, so the same Pillow writes the same bytes: thick outer walls, thinner interior
walls, doors as openings with a leaf and its swing arc, windows as double lines in the outer walls, and
room labels, in black on white.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (768, 512)
INK, PAPER = 0, 255
OUTER, INNER = 8, 4  # wall thickness in pixels
DOOR = 56  # door width, about 0.8 m at this scale

# Wall centre lines. Outer: the box's edges; inner: (x0, y0, x1, y1), horizontal or vertical.
BOX = (40, 40, 728, 472)
INNER_WALLS = [(40, 300, 728, 300), (400, 40, 400, 472), (560, 300, 560, 472)]

# Doors: hinge point, direction of the closed opening along the wall, direction the leaf swings into.
DOORS = [
    ((150, 300), (1, 0), (0, 1)),  # living -> kitchen
    ((440, 300), (1, 0), (0, -1)),  # hall -> bedroom
    ((400, 380), (0, 1), (-1, 0)),  # hall -> kitchen
    ((560, 360), (0, 1), (1, 0)),  # hall -> bath
    ((450, 472), (1, 0), (0, -1)),  # front door
]

# Windows: (x0, y0, x1, y1) spans along the outer walls' centre lines.
WINDOWS = [
    (120, 40, 300, 40),
    (500, 40, 640, 40),
    (40, 100, 40, 230),
    (120, 472, 280, 472),
    (728, 100, 728, 220),
    (728, 370, 728, 430),
]

LABELS = {
    "LIVING": (220, 170),
    "KITCHEN": (220, 390),
    "BEDROOM": (564, 170),
    "HALL": (480, 340),
    "BATH": (644, 420),
}


def draw_plan() -> Image.Image:
    """The plan as an 8-bit grayscale image."""
    image = Image.new("L", SIZE, PAPER)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = BOX
    for wall in [(x0, y0, x1, y0), (x1, y0, x1, y1), (x0, y1, x1, y1), (x0, y0, x0, y1)]:
        _wall(draw, wall, OUTER)
    for wall in INNER_WALLS:
        _wall(draw, wall, INNER)
    for span in WINDOWS:
        _window(draw, span)
    for hinge, along, swing in DOORS:
        _door(draw, hinge, along, swing)
    font = ImageFont.load_default(size=16)
    for text, centre in LABELS.items():
        draw.text(centre, text, fill=INK, font=font, anchor="mm")
    return image


def _wall(draw: ImageDraw.ImageDraw, line: tuple[int, int, int, int], thickness: int) -> None:
    # A filled box rather than a wide line: wide lines leave notches where walls meet at corners.
    x0, y0, x1, y1 = line
    half = thickness // 2
    draw.rectangle((x0 - half, y0 - half, x1 + half - 1, y1 + half - 1), fill=INK)


def _window(draw: ImageDraw.ImageDraw, span: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = span
    half = OUTER // 2
    if y0 == y1:  # in a horizontal wall
        draw.rectangle((x0, y0 - half, x1, y0 + half - 1), fill=PAPER)
        for y in (y0 - half, y0 + half - 1):
            draw.line((x0, y, x1, y), fill=INK)
        for x in (x0, x1):
            draw.line((x, y0 - half, x, y0 + half - 1), fill=INK)
    else:
        draw.rectangle((x0 - half, y0, x0 + half - 1, y1), fill=PAPER)
        for x in (x0 - half, x0 + half - 1):
            draw.line((x, y0, x, y1), fill=INK)
        for y in (y0, y1):
            draw.line((x0 - half, y, x0 + half - 1, y), fill=INK)


def _door(draw: ImageDraw.ImageDraw, hinge: tuple[int, int], along: tuple[int, int], swing: tuple[int, int]) -> None:
    hx, hy = hinge
    (ax, ay), (sx, sy) = along, swing
    half = OUTER // 2  # wide enough to clear outer walls too
    # The opening: paper across the wall, from the hinge to the far jamb.
    xs, ys = (hx, hx + ax * DOOR), (hy, hy + ay * DOOR)
    draw.rectangle((min(xs) - half * ay, min(ys) - half * ax, max(xs) + half * ay, max(ys) + half * ax), fill=PAPER)
    # The leaf, drawn open at right angles to the wall.
    draw.line((hx, hy, hx + sx * DOOR, hy + sy * DOOR), fill=INK, width=2)
    # The quarter circle its free edge sweeps, from the closed position to the open one. Pillow's angles
    # are degrees clockwise from +x (y points down), so each direction maps to a multiple of 90.
    closed, opened = _angle(along), _angle(swing)
    start, end = (closed, opened) if (opened - closed) % 360 == 90 else (opened, closed)
    box = (hx - DOOR, hy - DOOR, hx + DOOR, hy + DOOR)
    draw.arc(box, start, end if end > start else end + 360, fill=INK, width=1)


def _angle(direction: tuple[int, int]) -> int:
    return {(1, 0): 0, (0, 1): 90, (-1, 0): 180, (0, -1): 270}[direction]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("floorplan.png")
    draw_plan().save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
