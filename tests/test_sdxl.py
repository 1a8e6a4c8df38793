"""SDXL on the tiny-sdxl presets: family detection from config, renders with one and two ControlNets, a VAE of
its own, and the same promises as SD 1.5 renders (scale 0 ignores the control map, same seed same image)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.errors import InvalidInput, ModelError
from tests.models_fixture import PLAN_A, PLAN_B, SIZE, STEPS, tiny_render
from workers.engine.family import family
from workers.engine.models import ModelCache
from workers.engine.pipeline import ControlInput
from workers.engine.presets import resolve

NET = "tiny-sdxl-controlnet"


run = functools.partial(tiny_render, base="tiny-sdxl", net=NET)


def floats(cache: ModelCache, *controls: ControlInput, **overrides) -> np.ndarray:
    return run(cache, controls=list(controls), output_type="np", **overrides).images[0]


# --- family -----------------------------------------------------------------------------------------------


def test_family_comes_from_the_config_not_the_name(models_dir: Path, tmp_path: Path) -> None:
    sdxl, sd15 = Path(resolve("tiny-sdxl", models_dir)), Path(resolve("tiny-sd15", models_dir))
    assert (family(str(sdxl)), family(str(sd15))) == ("sdxl", "sd15")
    assert json.loads((sdxl / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    # Names that say the opposite change nothing.
    shutil.copytree(sdxl, tmp_path / "sd15-base")
    shutil.copytree(sd15, tmp_path / "sdxl-base")
    assert (family(str(tmp_path / "sd15-base")), family(str(tmp_path / "sdxl-base"))) == ("sdxl", "sd15")
    # Without a model_index.json the UNet's added time embedding ("text_time") still tells SDXL.
    (tmp_path / "unet-only" / "unet").mkdir(parents=True)
    shutil.copy(sdxl / "unet" / "config.json", tmp_path / "unet-only" / "unet" / "config.json")
    assert family(str(tmp_path / "unet-only")) == "sdxl"
    with pytest.raises(ModelError, match="not a diffusers base model"):
        family(resolve(NET, models_dir))


@pytest.mark.slow
def test_a_renamed_sdxl_folder_loads_and_renders_as_sdxl(
    model_cache: ModelCache, models_dir: Path, tmp_path: Path
) -> None:
    renamed = shutil.copytree(resolve("tiny-sdxl", models_dir), tmp_path / "my-base")
    components = model_cache.base(str(renamed))
    assert set(components) == {
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "unet",
        "scheduler",
    }
    assert type(components["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    copied = run(model_cache, base=str(renamed), output_type="np").images[0]
    assert np.array_equal(copied, run(model_cache, output_type="np").images[0])


# --- renders ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_and_two_controlnets_render_at_the_requested_size(model_cache: ModelCache) -> None:
    one = run(model_cache, seeds=[1, 2])
    assert [(image.size, image.mode) for image in one.images] == [((SIZE, SIZE), "RGB")] * 2
    assert one.scheduler["class"] == "EulerDiscreteScheduler"  # SDXL's own, kept by "default"
    both = [ControlInput(NET, PLAN_A, 1.0, 0.0, 1.0), ControlInput(NET, PLAN_B, 0.8, 0.2, 0.7)]
    two = run(model_cache, controls=both, output_type="np").images[0]
    assert two.shape == (SIZE, SIZE, 3)
    assert np.abs(two - floats(model_cache, both[0])).max() > 0.01


@pytest.mark.slow
def test_control_image_matters_only_with_a_scale(model_cache: ModelCache) -> None:
    off_a = floats(model_cache, ControlInput(NET, PLAN_A, 0.0, 0.0, 1.0))
    off_b = floats(model_cache, ControlInput(NET, PLAN_B, 0.0, 0.0, 1.0))
    on_a = floats(model_cache, ControlInput(NET, PLAN_A, 1.0, 0.0, 1.0))
    on_b = floats(model_cache, ControlInput(NET, PLAN_B, 1.0, 0.0, 1.0))
    assert np.array_equal(off_a, off_b)
    assert np.abs(on_a - on_b).max() > 1e-6
    assert np.abs(on_a - off_a).max() > 0.05


@pytest.mark.slow
def test_same_seed_is_bitwise_identical_and_seeds_differ(model_cache: ModelCache) -> None:
    first, second, other = (np.asarray(run(model_cache, seeds=[seed]).images[0]) for seed in (7, 7, 8))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


@pytest.mark.slow
def test_a_separate_vae_replaces_the_base_one(model_cache: ModelCache, models_dir: Path, tmp_path: Path) -> None:
    vae = shutil.copytree(Path(resolve("tiny-sdxl", models_dir)) / "vae", tmp_path / "fp16-fix-vae")
    own = run(model_cache, vae=str(vae), output_type="np").images[0]
    assert model_cache.loads[str(vae.resolve())] == 1 and str(vae.resolve()) in model_cache.resident()
    assert np.array_equal(own, run(model_cache, output_type="np").images[0])


@pytest.mark.slow
def test_skipping_nets_outside_their_window_is_bitwise_neutral(model_cache: ModelCache) -> None:
    calls: list[int] = []
    handle = model_cache.controlnet(NET).register_forward_hook(lambda *_: calls.append(1))
    units = [ControlInput(NET, PLAN_A, 1.0, 0.0, 0.5), ControlInput(NET, PLAN_B, 0.6, 0.2, 1.0)]
    try:
        skipped = floats(model_cache, *units)
        assert len(calls) == 2 + 3  # Euler: STEPS timesteps; the windows cover steps 0-1 and 1-3
        computed = floats(model_cache, *units, skip_outside_window=False)
        assert len(calls) == 2 + 3 + 2 * STEPS
    finally:
        handle.remove()
    assert np.array_equal(skipped, computed)


def test_controlnet_of_another_family_is_refused(model_cache: ModelCache) -> None:
    with pytest.raises(InvalidInput, match="another kind of base model"):
        run(model_cache, controls=[ControlInput("tiny-canny", PLAN_A, 1.0, 0.0, 1.0)])
    with pytest.raises(InvalidInput, match="another kind of base model"):
        run(model_cache, base="tiny-sd15")


@pytest.mark.slow
def test_sdxl_finals_and_revisions_render_through_its_image_to_image_and_inpainting_pipelines(
    model_cache: ModelCache,
) -> None:
    """A final (image-to-image) and a revision (inpainting) of SDXL: its own pipelines, at the call's size; a
    low strength keeps the start closer than a high one."""
    from PIL import Image

    from workers.engine.pipeline import Item, Request, Unit, render_batch

    start = Image.new("RGB", (SIZE, SIZE), (150, 110, 70))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))

    def render(strength: float, region: Image.Image | None = None) -> np.ndarray:
        item = Item("a bright living room", "", 1, (PLAN_A,), start, region)
        request = Request(
            base="tiny-sdxl",
            units=[Unit(NET, 1.0, 0.0, 1.0)],
            items=[item],
            steps=STEPS * 2,
            guidance_scale=5.0,
            width=SIZE,
            height=SIZE,
            strength=strength,
            output_type="np",
        )
        (image,) = render_batch(model_cache, request).images
        assert image.shape == (SIZE, SIZE, 3)
        return image

    target = np.asarray(start, np.float32) / 255
    assert np.abs(render(0.25) - target).mean() < np.abs(render(1.0) - target).mean()
    render(1.0, mask)
