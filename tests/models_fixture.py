"""pytest plugin: the tiny model presets (SD 1.5- and SDXL-shaped), built once per test session, a CPU model
cache over them, and a switch that keeps the Hugging Face hub out of a test.

Listed in the root conftest's `pytest_plugins`, so any test can ask for `models_dir`, `model_cache`,
`embedded_settings` or `hub_offline`.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image, ImageDraw

from shared.config import Settings
from shared.registry import PRESETS
from workers.engine.models import ModelCache
from workers.engine.presets import resolve


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding every tiny preset, built offline (a few seconds) once per session."""
    folder = tmp_path_factory.mktemp("models")
    for name in sorted(PRESETS):
        resolve(name, folder)
    return folder


@pytest.fixture(scope="session")
def model_cache(models_dir: Path) -> ModelCache:
    """One cache for the session, as in a worker process: CPU, float32 (bitwise-reproducible there)."""
    return ModelCache(models_dir, torch.device("cpu"), torch.float32)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub access: a hub id is looked up in the local cache only, so a test never waits on the network.

    The hub library reads the variable at import; set both so nothing goes to the network either way.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


SIZE = 64
STEPS = 4


def control_plan(rooms: list[tuple[int, int, int, int]]) -> Image.Image:
    """A plan-like control map for engine tests: white room outlines (edges, as Canny gives them) on black."""
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for room in rooms:
        draw.rectangle(room, outline="white", width=2)
    return image


PLAN_A = control_plan([(4, 4, 40, 30), (40, 4, 60, 60)])
PLAN_B = control_plan([(8, 20, 56, 56)])


def tiny_render(cache, *, base: str, net: str, seeds=(1,), controls=None, **overrides):  # type: ignore[no-untyped-def]
    """One 64×64 render with the tests' standard prompt; `overrides` replace any argument of `render`."""
    from workers.engine.pipeline import ControlInput, render

    args = dict(
        base=base,
        controls=controls if controls is not None else [ControlInput(net, PLAN_A, 1.0, 0.0, 1.0)],
        prompt="a bright living room, oak floor",
        negative_prompt="blurry",
        seeds=list(seeds),
        steps=STEPS,
        guidance_scale=7.5,
        width=SIZE,
        height=SIZE,
    )
    return render(cache, **{**args, **overrides})


@pytest.fixture
def embedded_settings(tmp_path: Path, models_dir: Path) -> Settings:
    """The embedded farm (`Farm` with no broker) on a SQLite file, storage and the tiny models in `tmp_path`."""
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        models_dir=models_dir,
        broker_url=None,
        storage_url=str(tmp_path / "renders"),
    )
