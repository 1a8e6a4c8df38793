"""AdaptiveCanny and the fit-and-pad it shares with other preprocessors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from workers.preprocessors.canny import AdaptiveCanny
from workers.preprocessors.resize import fit_and_pad, resize_to_fit

EXAMPLE_PLAN = Path(__file__).resolve().parents[1] / "examples" / "floorplan.png"


def edges_of(image: Image.Image, width: int, height: int, **params: object) -> np.ndarray:
    """The edge map as a boolean H×W array, after checking it is a pure white-on-black RGB image."""
    result = AdaptiveCanny(**params)(image, width, height)
    assert (result.mode, result.size) == ("RGB", (width, height))
    pixels = np.asarray(result)
    assert set(np.unique(pixels)) <= {0, 255}
    assert (pixels == pixels[..., :1]).all()  # the three channels agree
    return pixels[..., 0] > 0


def boxed(width: int, height: int) -> Image.Image:
    """White paper with a thick black frame and a square in the middle, like walls round a room."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, height - 1), outline="black", width=max(2, min(width, height) // 20))
    side = min(width, height) // 4
    draw.rectangle((width // 2 - side, height // 2 - side, width // 2 + side, height // 2 + side), fill="black")
    return image


@pytest.mark.parametrize("source", [(300, 200), (200, 300), (250, 250)], ids=["landscape", "portrait", "square"])
@pytest.mark.parametrize("target", [(64, 64), (512, 768), (768, 512), (512, 512)])
def test_output_is_rgb_of_exactly_the_target_size(source: tuple[int, int], target: tuple[int, int]) -> None:
    assert edges_of(boxed(*source), *target).any()


@pytest.mark.parametrize(
    ("source", "target", "content"),
    [
        ((400, 200), (256, 256), (slice(64, 192), slice(0, 256))),  # bands above and below
        ((200, 400), (256, 256), (slice(0, 256), slice(64, 192))),  # bands left and right
    ],
)
def test_padding_is_black_and_content_centred(
    source: tuple[int, int], target: tuple[int, int], content: tuple[slice, slice]
) -> None:
    edges = edges_of(boxed(*source), *target)
    outside = np.ones_like(edges)
    outside[content] = False
    assert not edges[outside].any()
    rows, cols = np.nonzero(edges)
    # The frame's inner edge lies inside the content area, symmetric about the canvas centre.
    assert abs((rows.min() + rows.max()) / 2 - target[1] / 2) <= 1
    assert abs((cols.min() + cols.max()) / 2 - target[0] / 2) <= 1


def test_edges_found_on_the_example_plan() -> None:
    plan = Image.open(EXAMPLE_PLAN)
    for width, height in [(768, 512), (512, 512)]:
        share = edges_of(plan, width, height).mean()
        assert 0.01 < share < 0.1  # walls, doors and labels traced; not noise


def sketch_photo() -> Image.Image:
    """A phone photo of a sketch: 2000×1500, grey paper with grain, 3 px lines in a darker grey."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.clip(rng.normal(200, 6, (1500, 2000)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for y in range(200, 1300, 300):
        draw.line((150, y, 1850, y), fill=100, width=3)
    for x in range(150, 1900, 425):
        draw.line((x, 200, x, 1100), fill=100, width=3)
    return image


@pytest.mark.parametrize("size", [128, 512])
def test_thin_lines_of_a_large_plan_survive_a_small_render(size: int) -> None:
    """Traced before shrinking, then pooled: the pencil lines reach the map however small the render. Shrunk
    first (as the map was made before), the lines averaged into the paper and no edge was left at either size."""
    edges = edges_of(sketch_photo(), size, size)
    rows, cols = edges.any(axis=1), edges.any(axis=0)
    scale = size / 2000
    line_rows = [round((size - 1500 * scale) / 2 + y * scale) for y in (200, 500, 800, 1100)]
    assert all(rows[max(0, r - 2) : r + 3].any() for r in line_rows)  # every horizontal line is traced
    assert cols.sum() > 0.7 * 1700 * scale  # along its whole length
    assert edges.mean() < 0.2  # lines, not the paper's grain


def test_edges_stay_thin_when_enlarging() -> None:
    # Edges found at the output size are one pixel wide; an edge map scaled up would be 2+ pixels wide,
    # and full of 2×2 blocks.
    edges = edges_of(Image.open(EXAMPLE_PLAN), 1536, 1024)
    blocks = edges[:-1, :-1] & edges[1:, :-1] & edges[:-1, 1:] & edges[1:, 1:]
    assert edges.sum() > 10_000
    assert blocks.sum() < 20


def test_blank_paper_has_no_edges() -> None:
    assert not edges_of(Image.new("RGB", (300, 200), "white"), 512, 512).any()
    assert not edges_of(Image.new("L", (300, 200), 0), 512, 512).any()


def test_near_black_image() -> None:
    # Median 8 would give thresholds of about 5 and 11, tracing noise; the minimum gap keeps it quiet.
    noise = np.random.default_rng(0).normal(8, 2, (200, 300))
    dark = np.clip(noise, 0, 255).astype(np.uint8)
    assert edges_of(Image.fromarray(dark), 300, 200).mean() < 0.001
    dark[50:150, 100:200] = 48  # a dim room on the dark sheet
    edges = edges_of(Image.fromarray(dark), 300, 200)
    assert edges[45:155, 95:205].sum() > 300
    assert edges.sum() == edges[45:155, 95:205].sum()


@pytest.mark.parametrize("sigma", [0, -0.1, 1.5, float("nan")])
def test_invalid_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        AdaptiveCanny(sigma=sigma)


@pytest.mark.parametrize("blur", [2, 4, -1, 33, 3.0])
def test_invalid_blur(blur: int) -> None:
    with pytest.raises(ValueError, match="blur"):
        AdaptiveCanny(blur=blur)


@pytest.mark.parametrize(("sigma", "blur"), [(1.0, 0), (0.01, 1), (0.33, 31)])
def test_limits_are_valid(sigma: float, blur: int) -> None:
    edges_of(boxed(120, 80), 96, 96, sigma=sigma, blur=blur)


def test_deterministic() -> None:
    plan = Image.open(EXAMPLE_PLAN)
    first = AdaptiveCanny()(plan, 512, 512).tobytes()
    assert AdaptiveCanny()(plan, 512, 512).tobytes() == first
    assert AdaptiveCanny()(plan.copy(), 512, 512).tobytes() == first


@pytest.mark.parametrize("shape", [(30, 60), (30, 60, 3), (30, 60, 1)], ids=["gray", "rgb", "one-channel"])
def test_fit_and_pad_shapes(shape: tuple[int, ...]) -> None:
    array = np.full(shape, 200, dtype=np.uint8)
    result = fit_and_pad(array, 64, 64, fill=7)
    assert result.shape == (64, 64, *shape[2:]) and result.dtype == np.uint8
    assert (result[:16] == 7).all() and (result[48:] == 7).all()  # 64×32 content, centred
    assert (result[16:48] == 200).all()


def test_fit_and_pad_shrinks_by_averaging() -> None:
    # A one-pixel checkerboard halved: INTER_AREA gives even gray where nearest or cubic would alias.
    checkerboard = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    assert np.abs(fit_and_pad(checkerboard, 32, 32).astype(int) - 128).max() <= 1


def test_resize_to_fit_leaves_a_fitting_array_alone() -> None:
    array = np.zeros((32, 64), dtype=np.uint8)
    assert resize_to_fit(array, 64, 64) is array


@pytest.mark.parametrize(("width", "height"), [(0, 64), (64, -1), (64.0, 64)])
def test_fit_and_pad_rejects_bad_sizes(width: int, height: int) -> None:
    with pytest.raises(ValueError, match="width|height"):
        fit_and_pad(np.zeros((8, 8), dtype=np.uint8), width, height)
