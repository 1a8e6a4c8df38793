"""ControlMapCache over a real LocalStorage: memory, then shared storage, then computing, and its failures."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.errors import StorageError
from shared.storage.local import LocalStorage
from workers.controlmaps import ControlMapCache, storage_key

KEY: dict[str, Any] = {"plan": "ab" * 32, "preprocessor": "plan-depth-v1", "params": {"wall_px": 4}, "size": [64, 48]}


def noise(seed: int = 0, width: int = 64, height: int = 48) -> Image.Image:
    """A map no lossy codec could return unchanged: every pixel independent."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class Counting:
    """A compute callback that counts its calls."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.calls = 0

    def __call__(self) -> Image.Image:
        self.calls += 1
        return self.image.copy()


class Outage(LocalStorage):
    """Shared storage that is down: every read and write fails as a real backend's would."""

    def get(self, key: str) -> bytes:
        raise StorageError(f"cannot read {self.url(key)}: connection refused")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        raise StorageError(f"cannot write {self.url(key)}: connection refused")


def same(a: Image.Image, b: Image.Image) -> bool:
    return (a.mode, a.size, a.tobytes()) == (b.mode, b.size, b.tobytes())


def test_first_get_computes_then_memory_serves(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    cache = ControlMapCache(storage)
    compute = Counting(noise())
    assert same(cache.get(KEY, compute), compute.image)
    assert same(cache.get(dict(reversed(KEY.items())), compute), compute.image)  # key order is irrelevant
    assert (compute.calls, cache.computed, cache.memory_hits, cache.storage_hits) == (1, 1, 1, 0)
    assert storage.list("controlmaps/") == [storage_key(KEY)]
    assert storage_key(KEY).endswith(".png") and len(storage_key(KEY)) == len("controlmaps/") + 64 + 4


def test_another_worker_reads_storage_and_computes_nothing(tmp_path: Path) -> None:
    compute = Counting(noise())
    ControlMapCache(LocalStorage(tmp_path)).get(KEY, compute)
    other = ControlMapCache(LocalStorage(tmp_path))
    result = other.get(KEY, compute)
    assert same(result, compute.image)  # the PNG round trip is lossless
    assert (compute.calls, other.computed, other.storage_hits) == (1, 0, 1)
    other.get(KEY, compute)
    assert other.memory_hits == 1


@pytest.mark.parametrize(
    "change",
    [
        {"plan": "cd" * 32},
        {"preprocessor": "canny-v1"},
        {"params": {"wall_px": 5}},
        {"params": {"wall_px": 4, "gap_px": 96}},
        {"size": [48, 64]},
    ],
    ids=["plan", "preprocessor", "parameter", "more-parameters", "size"],
)
def test_any_change_in_the_key_computes_again(tmp_path: Path, change: dict[str, Any]) -> None:
    cache = ControlMapCache(LocalStorage(tmp_path))
    cache.get(KEY, Counting(noise(0)))
    result = cache.get({**KEY, **change}, Counting(noise(1)))
    assert same(result, noise(1)) and cache.computed == 2
    assert len(LocalStorage(tmp_path).list("controlmaps/")) == 2


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"not a png",
        lambda data: data[: len(data) // 2],
        lambda data: png(noise().convert("L")),
        lambda data: b"",
    ],
    ids=["garbage", "truncated", "grayscale", "empty"],
)
def test_a_damaged_stored_map_is_recomputed_and_replaced(
    tmp_path: Path, damage: Callable[[bytes], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    storage = LocalStorage(tmp_path)
    ControlMapCache(storage).get(KEY, Counting(noise()))
    name = storage_key(KEY)
    storage.put(name, damage(storage.get(name)))
    cache = ControlMapCache(storage)
    with caplog.at_level(logging.WARNING, logger="workers.controlmaps"):
        assert same(cache.get(KEY, Counting(noise())), noise())
    assert (cache.computed, cache.storage_hits) == (1, 0)
    assert "damaged" in caplog.text
    assert same(Image.open(io.BytesIO(storage.get(name))), noise())  # overwritten with a good copy


def test_a_storage_outage_does_not_fail_the_render(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ControlMapCache(Outage(tmp_path))
    compute = Counting(noise())
    with caplog.at_level(logging.WARNING, logger="workers.controlmaps"):
        assert same(cache.get(KEY, compute), noise())
    assert "reading" in caplog.text and "storing" in caplog.text
    assert same(cache.get(KEY, compute), noise())  # memory still works
    assert (compute.calls, cache.memory_hits) == (1, 1)
    assert not LocalStorage(tmp_path).list()


def test_memory_only_with_lru_eviction() -> None:
    cache = ControlMapCache(None, capacity=2)
    computes = [Counting(noise(seed)) for seed in range(3)]
    keys = [{**KEY, "plan": str(seed)} for seed in range(3)]
    cache.get(keys[0], computes[0])
    cache.get(keys[1], computes[1])
    cache.get(keys[0], computes[0])  # now the most recently used
    cache.get(keys[2], computes[2])  # evicts keys[1], the least recently used
    cache.get(keys[0], computes[0])
    cache.get(keys[1], computes[1])
    assert [c.calls for c in computes] == [1, 2, 1]
    assert (cache.computed, cache.memory_hits, cache.storage_hits) == (4, 2, 0)


def test_capacity_zero_keeps_nothing_in_memory(tmp_path: Path) -> None:
    cache = ControlMapCache(LocalStorage(tmp_path), capacity=0)
    compute = Counting(noise())
    cache.get(KEY, compute)
    cache.get(KEY, compute)
    assert (compute.calls, cache.memory_hits, cache.storage_hits) == (1, 0, 1)


def test_callers_get_copies() -> None:
    cache = ControlMapCache(None)
    cache.get(KEY, Counting(noise())).paste((0, 0, 0), (0, 0, 64, 48))
    assert same(cache.get(KEY, Counting(noise(1))), noise())


def test_maps_are_rgb_from_every_source(tmp_path: Path) -> None:
    gray = noise().convert("L")
    computed = ControlMapCache(LocalStorage(tmp_path)).get(KEY, Counting(gray))
    stored = ControlMapCache(LocalStorage(tmp_path)).get(KEY, Counting(gray))
    assert computed.mode == stored.mode == "RGB"
    assert same(computed, stored) and same(computed, gray.convert("RGB"))


@pytest.mark.parametrize("key", [{"plan": b"bytes"}, {"scale": float("nan")}, {"tags": {"a"}}])
def test_keys_must_be_plain_json(key: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        storage_key(key)


@pytest.mark.parametrize("capacity", [-1, 1.5])
def test_invalid_capacity(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        ControlMapCache(None, capacity=capacity)
