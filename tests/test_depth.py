"""DepthEstimator over the tiny DPT: loading offline, output shape, determinism, errors and sharing."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import DPTForDepthEstimation, pipeline

from shared.errors import ModelError
from workers.preprocessors.depth import DepthEstimator, depth_estimator
from workers.preprocessors.tiny_dpt import build_dpt

EXAMPLE_PLAN = Path(__file__).resolve().parents[1] / "examples" / "floorplan.png"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dpt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-dpt"
    build_dpt(folder)
    return folder


@pytest.fixture(scope="module")
def estimator(dpt_folder: Path) -> DepthEstimator:
    return DepthEstimator(str(dpt_folder), CPU, resolution=64)


def scene(width: int, height: int) -> Image.Image:
    """Something with structure for the model to see: a dark box on a light ground."""
    image = Image.new("RGB", (width, height), (220, 210, 200))
    ImageDraw.Draw(image).rectangle((width // 4, height // 3, width * 3 // 4, height - 1), fill=(40, 50, 60))
    return image


def test_build_is_fast_and_deterministic(tmp_path: Path) -> None:
    started = time.perf_counter()
    build_dpt(tmp_path / "a")
    assert time.perf_counter() - started < 2.0
    build_dpt(tmp_path / "b")
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"config.json", "preprocessor_config.json"}
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_folder_loads_as_a_published_model_would(dpt_folder: Path) -> None:
    # transformers' own depth pipeline reads the folder the way it reads Intel/dpt-large.
    result = pipeline("depth-estimation", model=str(dpt_folder))(scene(96, 64))
    assert result["depth"].size == (96, 64)


@pytest.mark.parametrize("source", [(768, 512), (300, 600), (100, 100)], ids=["landscape", "portrait", "square"])
@pytest.mark.parametrize("target", [(64, 64), (96, 64), (64, 96), (200, 120)])
@pytest.mark.slow
def test_output_is_rgb_of_exactly_the_target_size(
    estimator: DepthEstimator, source: tuple[int, int], target: tuple[int, int]
) -> None:
    result = estimator(scene(*source), *target)
    assert (result.mode, result.size) == ("RGB", target)
    pixels = np.asarray(result)
    assert (pixels == pixels[..., :1]).all()
    assert pixels.max() == 255  # normalised to the full range


def test_aspect_is_kept_and_padding_is_far(estimator: DepthEstimator) -> None:
    # 768×512 fits 96×96 as 96×64: 16 black rows above and below, the map between them.
    pixels = np.asarray(estimator(Image.open(EXAMPLE_PLAN), 96, 96))[..., 0]
    assert not pixels[:16].any() and not pixels[80:].any()
    assert pixels[16:80].max() == 255


def test_deterministic_and_input_dependent(dpt_folder: Path, estimator: DepthEstimator) -> None:
    image = scene(160, 120)
    first = estimator(image, 64, 64).tobytes()
    assert estimator(image, 64, 64).tobytes() == first
    assert DepthEstimator(str(dpt_folder), CPU, resolution=64)(image.copy(), 64, 64).tobytes() == first
    # The untrained model still reacts to what it sees, so the checks above are not about a constant.
    assert estimator(Image.open(EXAMPLE_PLAN), 64, 64).tobytes() != first


@pytest.mark.slow
def test_plain_images_do_not_crash(estimator: DepthEstimator) -> None:
    for image in (Image.new("RGB", (50, 40), "white"), Image.new("L", (40, 50), 0), Image.new("RGBA", (8, 8))):
        assert estimator(image, 32, 32).size == (32, 32)


def test_flat_prediction_gives_a_black_map(dpt_folder: Path, tmp_path: Path) -> None:
    # A real model whose last layer ignores its input: every pixel predicts the same depth.
    model = DPTForDepthEstimation.from_pretrained(dpt_folder)
    last = model.head.head[-2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(0.5)
    model.save_pretrained(tmp_path / "flat")
    (tmp_path / "flat" / "preprocessor_config.json").write_bytes((dpt_folder / "preprocessor_config.json").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 0/0 on the way
        result = DepthEstimator(str(tmp_path / "flat"), CPU, resolution=64)(scene(80, 60), 64, 48)
    assert result.size == (64, 48) and not np.asarray(result).any()


@pytest.mark.slow
def test_other_resolutions(estimator: DepthEstimator) -> None:
    wide = estimator.at_resolution(128)
    assert wide.model is estimator.model and estimator.resolution == 64
    assert wide(scene(160, 120), 64, 64).size == (64, 64)
    assert wide(scene(160, 120), 64, 64).tobytes() != estimator(scene(160, 120), 64, 64).tobytes()


@pytest.mark.parametrize("resolution", [0, 8, 100, 64.0])
def test_invalid_resolution(estimator: DepthEstimator, resolution: int) -> None:
    with pytest.raises(ValueError, match="resolution"):
        estimator.at_resolution(resolution)


def test_missing_model_is_a_model_error(tmp_path: Path) -> None:
    for location in (tmp_path / "missing", tmp_path):  # no folder; a folder without a model in it
        with pytest.raises(ModelError, match="cannot load depth model") as caught:
            DepthEstimator(str(location), CPU)
        assert "\n" not in str(caught.value) and str(location) in str(caught.value)


def test_a_folder_of_another_kind_of_model_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "not-a-model"}')
    with pytest.raises(ModelError, match="cannot load depth model"):
        DepthEstimator(str(tmp_path), CPU)


def test_estimators_are_shared(dpt_folder: Path) -> None:
    location = str(dpt_folder)
    first = depth_estimator(location, CPU, 64)
    assert depth_estimator(location, torch.device("cpu"), 64) is first
    other = depth_estimator(location, CPU, 128)
    assert other is not first and other.resolution == 128
    assert other.model is first.model  # another resolution, the same loaded weights
    assert depth_estimator(location, CPU, 128) is other
