"""Control maps computed once and reused: by this worker from memory, by every worker from shared storage.

A job renders the same plan many times (styles, seeds, prompts), each with the same control map, and a
depth map costs a model forward pass. So maps are cached under a digest of everything that determines
them, first in the process, then in the object store all workers share. The cache only ever saves work:
a storage outage or a damaged stored map costs a recomputation, never a failed render.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

from shared.errors import StorageError
from shared.storage.base import Storage

log = logging.getLogger(__name__)

PREFIX = "controlmaps/"


def storage_key(key: Mapping[str, Any]) -> str:
    """Where the map for `key` is stored: the sha256 of its canonical JSON (sorted keys, no spaces).

    Canonical, so equal keys built in any order or on any worker name the same object. TypeError or
    ValueError if `key` holds what JSON cannot represent exactly (bytes, sets, NaN).
    """
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return f"{PREFIX}{hashlib.sha256(canonical.encode()).hexdigest()}.png"


class ControlMapCache:
    """An LRU of control maps in memory, in front of a shared store; one per worker process.

    A key must name everything the map depends on, e.g. the plan's content hash, the preprocessor and a
    version of its algorithm, its parameters and the size: a stale key serves a stale map to every worker.
    Maps are 8-bit RGB and stored as PNG, so a map read back is identical to the one computed. Not
    thread-safe: the rendering thread alone uses it.
    """

    def __init__(self, storage: Storage | None, capacity: int = 64) -> None:
        """`storage` is shared by all workers (None: memory only); `capacity` maps stay in memory (0: none)."""
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative integer, got {capacity!r}")
        self.storage = storage
        self.capacity = capacity
        self.computed = 0
        self.memory_hits = 0
        self.storage_hits = 0
        self._memory: OrderedDict[str, Image.Image] = OrderedDict()

    def get(self, key: Mapping[str, Any], compute: Callable[[], Image.Image]) -> Image.Image:
        """The map for `key`: from memory, else from storage, else `compute()` (then stored in both).

        Each call returns its own copy, so a caller that draws on a map cannot change what others get.
        """
        name = storage_key(key)
        if name in self._memory:
            self._memory.move_to_end(name)
            self.memory_hits += 1
            return self._memory[name].copy()
        image = self._load(name)
        if image is not None:
            self.storage_hits += 1
        else:
            image = compute()
            # Storage holds RGB PNGs; converting here too makes all three sources return the same pixels.
            image = image if image.mode == "RGB" else image.convert("RGB")
            self.computed += 1
            self._store(name, image)
        self._remember(name, image)
        return image.copy()

    def _load(self, name: str) -> Image.Image | None:
        if self.storage is None:
            return None
        try:
            data = self.storage.get(name)
        except FileNotFoundError:
            return None
        except StorageError as error:
            log.warning("control map cache: reading %s failed, computing the map instead: %s", name, error)
            return None
        try:
            return _decode(data)
        except Exception as error:  # noqa: BLE001 - Pillow reports a damaged file with many exception types
            log.warning("control map cache: %s is damaged (%s); computing it again", name, error)
            return None

    def _store(self, name: str, image: Image.Image) -> None:
        if self.storage is None:
            return
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        try:
            self.storage.put(name, buffer.getvalue(), "image/png")
        except StorageError as error:
            log.warning("control map cache: storing %s failed; the render goes on without it: %s", name, error)

    def _remember(self, name: str, image: Image.Image) -> None:
        if not self.capacity:
            return
        self._memory[name] = image
        self._memory.move_to_end(name)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=["PNG"]) as stored:
        stored.load()  # Image.open is lazy: a truncated file must fail here, not later in a render
        if stored.mode != "RGB":
            raise ValueError(f"mode {stored.mode}, where control maps are RGB")
        return stored.copy()
