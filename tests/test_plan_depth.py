"""PlanDepth: depth read from a plan's geometry, on the example plan and on the awkward inputs around it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from workers.preprocessors.plan_depth import PlanDepth

EXAMPLE_PLAN = Path(__file__).resolve().parents[1] / "examples" / "floorplan.png"

# Points of examples/floorplan.png (768×512; see examples/make_floorplan.py), as (x, y).
WALLS = {"outer": (40, 280), "inner vertical": (400, 150), "inner horizontal": (300, 300), "bath": (560, 440)}
ROOMS = {"living": (120, 120), "bedroom": (640, 120), "kitchen": (120, 420), "hall": (480, 400), "bath": (680, 340)}
# Label boxes (x0, y0, x1, y1) round the room names, and the thin strokes of one door.
LABELS = {
    "LIVING": (188, 160, 252, 180),
    "BEDROOM": (520, 160, 608, 180),
    "KITCHEN": (184, 380, 256, 400),
    "HALL": (456, 330, 504, 350),
    "BATH": (620, 410, 668, 430),
}
DOOR = {"leaf": (150, 330), "arc": (190, 340)}


def depth_of(image: Image.Image, width: int, height: int, **params: object) -> np.ndarray:
    """The depth map as an H×W uint8 array, after checking it is a gray RGB image of the asked size."""
    result = PlanDepth(**params)(image, width, height)
    assert (result.mode, result.size) == ("RGB", (width, height))
    pixels = np.asarray(result)
    assert (pixels == pixels[..., :1]).all()  # the three channels agree
    return pixels[..., 0]


@pytest.fixture(scope="module")
def example() -> np.ndarray:
    return depth_of(Image.open(EXAMPLE_PLAN), 768, 512)


def test_walls_are_nearest(example: np.ndarray) -> None:
    for name, (x, y) in WALLS.items():
        assert example[y, x] == 255, name


def test_rooms_are_floor_below_the_walls(example: np.ndarray) -> None:
    floor, rim = PlanDepth().floor, PlanDepth().rim
    for name, (x, y) in ROOMS.items():
        assert floor <= example[y, x] <= rim, name  # neither outside (0) nor wall (255)
    # Floor is brightest beside a wall and falls away from it.
    row = example[150, 300:400].astype(int)
    assert (np.diff(row[50:95]) >= 0).all() and row[95] > row[50] + 40


def test_walls_divide_the_rooms(example: np.ndarray) -> None:
    # Across the plan from the living room to the bedroom: floor, the wall between them, floor again.
    row = example[120, 60:720]
    peaks = np.flatnonzero(row == 255) + 60
    assert peaks.size and peaks.min() >= 396 and peaks.max() <= 404
    assert row[0] < 255 and row[-1] < 255


def test_outside_is_farthest(example: np.ndarray) -> None:
    # The building's outer faces are at 36 and 731 across, 36 and 475 down.
    assert not example[:34].any() and not example[478:].any()
    assert not example[:, :34].any() and not example[:, 734:].any()


def test_labels_and_door_strokes_are_not_walls(example: np.ndarray) -> None:
    for name, (x0, y0, x1, y1) in LABELS.items():
        area = example[y0:y1, x0:x1]
        assert area.max() <= PlanDepth().rim, name
        assert area.min() > 0, name
    for name, (x, y) in DOOR.items():
        assert 0 < example[y, x] <= PlanDepth().rim, name


def test_thin_strokes_are_walls_when_wall_px_says_so() -> None:
    # A one-pixel opening keeps every stroke: then the labels do read as walls, so wall_px is what hides them.
    depth = depth_of(Image.open(EXAMPLE_PLAN), 768, 512, wall_px=1)
    x0, y0, x1, y1 = LABELS["BEDROOM"]
    assert (depth[y0:y1, x0:x1] == 255).any()


def test_text_outside_the_building_is_outside() -> None:
    plan = Image.open(EXAMPLE_PLAN).convert("L")
    sheet = Image.new("L", (768, 640), 255)
    sheet.paste(plan)
    ImageDraw.Draw(sheet).text((384, 600), "GROUND FLOOR 1:100", fill=0, font=ImageFont.load_default(size=24))
    depth = depth_of(sheet, 768, 640)
    assert not depth[560:].any()
    assert depth[120, 120] > 0  # the building is still there


def test_a_close_crop_keeps_its_outside() -> None:
    # The outer faces 20 px from every edge: closing door gaps must not seal the building to the image edge.
    depth = depth_of(Image.open(EXAMPLE_PLAN).crop((16, 16, 752, 496)), 736, 480)
    assert not depth[:18].any() and not depth[462:].any()
    assert not depth[:, :18].any() and not depth[:, 718:].any()
    assert depth[104, 104] > 0


def test_padding_is_far_and_content_centred() -> None:
    depth = depth_of(Image.open(EXAMPLE_PLAN), 512, 512)
    # 768×512 fits 512×512 as 512×341: bands of 85 and 86 rows above and below.
    assert not depth[:85].any() and not depth[427:].any()
    assert (depth[85:427] == 255).any()


def test_a_blueprint_reads_as_the_same_plan(example: np.ndarray) -> None:
    """Light lines on a dark blue sheet: the lines are the ink, as on paper."""
    grey = np.asarray(Image.open(EXAMPLE_PLAN).convert("L")).astype(np.float32) / 255
    blue, white = np.array([30, 70, 140]), np.array([235, 240, 255])
    blueprint = (blue + (1 - grey)[..., None] * (white - blue)).astype(np.uint8)
    depth = depth_of(Image.fromarray(blueprint), 768, 512)
    zones = [np.select([d == 0, d == 255], [0, 2], 1) for d in (depth, example)]  # outside, floor, wall
    assert (zones[0] == zones[1]).mean() > 0.98


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_blank_paper_is_all_far(mode: str) -> None:
    assert not depth_of(Image.new(mode, (300, 200), "white"), 128, 96).any()


def test_tiny_images() -> None:
    assert not depth_of(Image.new("L", (16, 16), 255), 64, 64).any()
    room = Image.new("L", (16, 16), 255)
    ImageDraw.Draw(room).rectangle((2, 2, 13, 13), outline=0, width=2)
    depth = depth_of(room, 16, 16)
    assert depth[8, 8] > 0 and depth[8, 8] < 255  # a room
    assert depth[8, 2] > 250  # its wall (blended a little with its neighbours when scaled down)
    assert depth[0, 0] == 0  # outside
    depth_of(Image.new("L", (1, 1), 0), 8, 8)


def scan(width: int = 4000, height: int = 3000) -> Image.Image:
    """A big scan: walls 40 px thick, a window drawn as two hairline panes across a gap, a door opening."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((400, 400, 3600, 2600), outline="black", width=40)
    draw.rectangle((2000, 400, 2040, 2600), fill="black")  # a wall between two rooms
    draw.rectangle((1000, 400, 1800, 440), fill="white")  # the window's opening...
    for y in (400, 439):
        draw.line((1000, y, 1800, y), fill="black")  # ...and its panes, 1 px: mid-gray once scaled down
    draw.rectangle((2600, 2560, 2900, 2600), fill="white")  # a door, about 8% of the width
    return image


def test_big_scan_is_not_flooded_through_thin_lines() -> None:
    depth = depth_of(scan(), 1024, 768)
    # At 1024×768 the scan's coordinates are divided by 3.906; both rooms are floor, outside is not.
    assert depth[300, 150] > 0 and depth[300, 800] > 0
    assert depth[120, 350] > 0  # just inside the window
    assert depth[640, 700] > 0  # just inside the door
    assert not depth[:95].any() and not depth[:, :95].any()
    assert depth[103, 600] == 255  # the top wall beside the window


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("threshold", 0),
        ("threshold", 256),
        ("threshold", 127.5),
        ("wall_px", 0),
        ("wall_px", 65),
        ("wall_px", 3.0),
        ("gap_px", -1),
        ("gap_px", 513),
        ("falloff_px", 0),
        ("falloff_px", float("nan")),
        ("falloff_px", "48"),
        ("floor", 0),
        ("floor", 255),
        ("rim", 255),
        ("rim", 50),  # below the default floor
    ],
)
def test_invalid_parameters(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        PlanDepth(**{name: value})


def test_flat_floor_and_no_gap_closing_are_valid() -> None:
    # rim == floor: a floor at one level, as a camera straight above would see it.
    depth = depth_of(Image.open(EXAMPLE_PLAN), 768, 512, floor=100, rim=100, gap_px=0)
    for name, (x, y) in ROOMS.items():
        assert depth[y, x] == 100, name
    assert set(np.unique(depth[60:460, 60:720])) >= {100, 255}


def test_deterministic() -> None:
    plan = Image.open(EXAMPLE_PLAN)
    assert PlanDepth()(plan, 512, 384).tobytes() == PlanDepth()(plan.convert("RGB"), 512, 384).tobytes()
