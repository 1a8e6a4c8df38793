"""Set consistency: how alike a style's views look (palette in CIELAB, texture), and which images stray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.consistency import consistency, palette_match, srgb_to_lab
from workers.look import look


def _room(colour: tuple[int, int, int], grain: float, seed: int, size: int = 128) -> Image.Image:
    """A view: a wall colour, darker and lighter patches where the layout puts them, surface grain."""
    rng = np.random.default_rng(seed)
    image = np.ones((size, size, 3)) * np.array(colour, dtype=float)
    for _ in range(4):
        x, y, w, h = rng.integers(0, size * 3 // 4, 4)
        image[y : y + h // 2 + 10, x : x + w // 2 + 10] *= rng.uniform(0.6, 1.1)
    image += rng.normal(0, grain, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def test_one_palette_and_texture_scores_above_a_mix_and_a_stray_view_is_flagged() -> None:
    beige = [_room((200, 180, 150), 6, seed) for seed in range(8)]
    rng = np.random.default_rng(0)
    mixed = [_room(tuple(rng.integers(30, 230, 3)), float(rng.choice([2, 6, 20])), seed) for seed in range(8)]
    one, many = consistency([look(i) for i in beige]), consistency([look(i) for i in mixed])
    assert one is not None and many is not None
    assert one.score > 0.9 > 0.6 > many.score and one.outliers == []
    blue = beige[:7] + [_room((60, 90, 200), 6, 99)]
    strayed = consistency([look(i) for i in blue])
    assert strayed is not None and strayed.outliers == [7] and strayed.score < one.score
    rough = beige[:7] + [_room((200, 180, 150), 40, 99)]  # the same palette, another surface
    textured = consistency([look(i) for i in rough])
    assert textured is not None and textured.outliers == [7]


def test_views_rendered_with_one_pack_score_above_the_same_views_each_with_a_pack_of_its_own(
    models_dir: Path, tmp_path: Path
) -> None:
    """Six views (two plans × three seeds) of the tiny SD 1.5 with one style pack's LoRA, against the same views
    each with another pack's (random styles). The toy VAE draws every colour near one beige, so the margin is
    small (0.964 against 0.938 when written); a ranking the score gets wrong fails it."""
    import torch

    from tests.models_fixture import PLAN_A, PLAN_B
    from workers.engine.loras import Lora
    from workers.engine.models import ModelCache
    from workers.engine.pipeline import Item, Request, Unit, render_batch
    from workers.engine.presets import resolve
    from workers.engine.tiny import style_lora

    base = Path(resolve("tiny-sd15", models_dir))
    packs = [Lora(str(style_lora(base, tmp_path / f"pack{i}", i)), 2.0, f"{i:064x}") for i in range(1, 7)]
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    views = [(plan, seed) for plan in (PLAN_A, PLAN_B) for seed in (1, 2, 3)]

    def signature(lora: Lora, plan: Image.Image, seed: int) -> list[float]:
        item = Item("a bright living room", "blurry", seed, (plan,))
        request = Request("tiny-sd15", [Unit("tiny-canny", 1.0, 0.0, 1.0)], [item], 4, 7.5, 64, 64, lora=lora)
        return look(render_batch(cache, request).images[0])

    one = consistency([signature(packs[0], plan, seed) for plan, seed in views])
    each = consistency([signature(pack, plan, seed) for pack, (plan, seed) in zip(packs, views, strict=True)])
    assert one is not None and each is not None
    assert one.score > each.score, (one.score, each.score)


def test_a_palette_measures_the_share_of_each_views_colour_on_it() -> None:
    import cv2

    colours = np.random.default_rng(0).uniform(0, 1, (200, 3))
    expected = cv2.cvtColor(colours[None].astype(np.float32), cv2.COLOR_RGB2LAB)[0]
    assert np.abs(srgb_to_lab(colours) - expected).max() < 0.5  # OpenCV rounds; a bin is 20 units wide
    beige = [look(_room((200, 180, 150), 6, seed)) for seed in range(4)]
    warm, cold = ["#c8b496", "#8c6e50"], ["#3c5ac8", "#285078"]
    assert min(palette_match(view, warm) for view in beige) > 0.9
    assert max(palette_match(view, cold) for view in beige) < 0.05
    half = look(Image.fromarray(np.hstack([np.asarray(_room(c, 2, 1)) for c in ((200, 180, 150), (60, 90, 200))])))
    assert 0.4 < palette_match(half, warm) < 0.6 and palette_match(half, [*warm, cold[0]]) > 0.95
    measured = consistency(beige, warm)
    mean = float(np.mean([palette_match(v, warm) for v in beige]))
    assert measured is not None and measured.palette == pytest.approx(mean, abs=1e-4)
    assert consistency(beige) is not None and consistency(beige).palette is None  # type: ignore[union-attr]


def test_a_signature_does_not_depend_on_the_delivery_size_and_small_sets_are_not_scored() -> None:
    view = _room((120, 140, 110), 6, 3, size=1024)  # a delivery-size render, and its preview at half the size
    large, small = np.array(look(view)), np.array(look(view.resize((512, 512), Image.Resampling.BOX)))
    assert np.abs(small - large).sum() < 0.1 and small.shape == (52,)
    assert consistency([look(view)] * 2) is None


@pytest.mark.slow
def test_a_jobs_status_and_sheet_carry_each_styles_score_measured_on_its_stored_images(
    tmp_path: Path, models_dir: Path, example_plan: Path
) -> None:
    from typer.testing import CliRunner

    from producer.cli import app
    from producer.client import Farm
    from shared.config import Settings

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        storage_url=str(tmp_path / "out"),
        models_dir=models_dir,
        broker_url=None,
    )
    profile = {"base": "tiny-sd15", "controls": [{"kind": "plan-depth", "model": "tiny-plan"}], "steps": 4}
    profile |= {"width": 64, "height": 64}
    japandi = {"name": "japandi", "prompt": "a japandi room, oak and paper", "palette": ["#c8b496", "#8c6e50"]}
    job = {"plans": [str(example_plan)], "styles": ["modern", japandi], "seeds": {"count": 3}, "profile": profile}
    with Farm(settings) as farm:
        job_id = farm.submit(job)
        view, sheet, images = farm.status(job_id), farm.sheet(job_id), farm.results(job_id)
    assert [(m.style, m.images) for m in view.consistency] == [("japandi", 3), ("modern", 3)]
    for measured in view.consistency:
        stored = [Image.open(i.url.removeprefix("file://")) for i in images if i.style == measured.style]
        again = consistency(
            [look(image) for image in stored], japandi["palette"] if measured.style == "japandi" else None
        )
        assert again is not None and (again.score, again.palette) == (measured.score, measured.palette)
    assert view.consistency[0].palette is not None and view.consistency[1].palette is None
    rows = sheet.to_dict()["rows"]
    assert {row["style"]: row["consistency"] for row in rows} == {m.style: m.score for m in view.consistency}
    assert {row["style"]: row["palette"] for row in rows} == {m.style: m.palette for m in view.consistency}
    env = {
        f"ARCHFARM_{k.upper()}": str(v)
        for k, v in settings.model_dump().items()
        if v is not None and k in ("database_url", "storage_url", "models_dir")
    }
    printed = CliRunner().invoke(app, ["status", job_id], env=env).output
    assert f"consistency modern: {view.consistency[1].score:.2f} over 3 images" in printed
    assert f"{view.consistency[0].palette:.0%} of colour on its palette" in printed
    assert json.loads(CliRunner().invoke(app, ["status", job_id, "--json"], env=env).output)["consistency"]
