"""pytest plugin: the tiny model presets, built once per test session, and a CPU model cache over them.

Listed in the root conftest's `pytest_plugins`, so any test can ask for `models_dir` or `model_cache`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.engine.models import ModelCache
from workers.engine.presets import PRESET_NAMES, resolve


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding every tiny preset, built offline (about a second) once per session."""
    folder = tmp_path_factory.mktemp("models")
    for name in sorted(PRESET_NAMES):
        resolve(name, folder)
    return folder


@pytest.fixture(scope="session")
def model_cache(models_dir: Path) -> ModelCache:
    """One cache for the session, as in a worker process: CPU, float32 (bitwise-reproducible there)."""
    return ModelCache(models_dir, torch.device("cpu"), torch.float32)
