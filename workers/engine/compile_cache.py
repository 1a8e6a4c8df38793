"""Compiled code shared by a fleet: a stack, size and batch bucket is compiled by one worker, not by each.

A first compiled call costs 80+ s on a GPU (and minutes on a CPU), almost all of it inductor generating and
building kernels. torch can serialise what it generated (`torch.compiler.save_cache_artifacts`: the FX graph,
AOTAutograd and autotuning caches) and hot-load it into another process (`load_cache_artifacts`), where the
same compile then hits those caches and only traces. The first worker to compile a key stores the artefacts
in the farm's storage; every later worker, and `archfarm warmup` ahead of a job, loads them before its first
call. The key holds what the artefacts depend on: torch version, device model, stack, size, batch bucket,
dtype and compile settings. The cache is an optimisation: a storage error costs a cold compile, never a task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch.compiler._cache import CacheArtifactManager

from shared.storage import Storage
from workers.engine.compile import CompileOptions

log = logging.getLogger(__name__)

PREFIX = "compile-cache"


@dataclass(frozen=True)
class CompileKey:
    """One compiled shape of one stack: what a set of compile artefacts is valid for."""

    stack: tuple[str, ...]
    """Model names; a local folder by the sha256 of its weights, so workers holding it elsewhere share it."""
    width: int
    height: int
    batch: int
    dtype: str
    options: CompileOptions
    sampler: str = "default"
    """The scheduler: its timestep dtype is part of the traced graphs."""
    guided: bool = True
    """Classifier-free guidance doubles the UNet's batch."""
    windows: tuple[tuple[float, float], ...] = ()
    """Each unit's guidance window: steps no ControlNet runs at trace a UNet graph without residuals."""

    def object_key(self, device: torch.device) -> str:
        """`compile-cache/torch-2.x/<device model>/<digest>.bin`: artefacts never cross torch versions or GPU
        models (their kernels are built for one), and the folders say what each holds."""
        fields = {**asdict(self), "stack": list(self.stack), "options": asdict(self.options)}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
        return f"{PREFIX}/{_slug('torch-' + torch.__version__)}/{_slug(device_model(device))}/{digest}.bin"


def device_model(device: torch.device) -> str:
    """The device's model name (`NVIDIA H200`), or its type for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "unknown"


@dataclass(frozen=True)
class Warmth:
    """How a key's first call in this process was served: `cold` (compiled here, then stored for the fleet),
    `warm` (artefacts loaded from the fleet), or `compiled` (this process had compiled it already)."""

    state: str
    load_s: float = 0.0


class FleetCompileCache:
    """One per worker process: loads a key's artefacts before its first call and stores them after a cold one."""

    def __init__(self, storage: Storage | None, device: torch.device) -> None:
        self.storage = storage
        self.device = device
        self._done: set[str] = set()

    @contextmanager
    def around(self, key: CompileKey) -> Iterator[Warmth]:
        """Wrap the first call of `key` in this process; later calls pass straight through."""
        name = key.object_key(self.device)
        if name in self._done:
            yield Warmth("compiled")
            return
        started = time.perf_counter()
        warm = self.storage is not None and self._load(name)
        if not warm:
            # torch records every artefact since the process started: stored after this call, the bundle
            # would repeat every earlier key's.
            CacheArtifactManager.clear()
        yield Warmth("warm" if warm else "cold", time.perf_counter() - started)
        if not warm and self.storage is not None:
            self._store(name)
        self._done.add(name)

    def _load(self, name: str) -> bool:
        assert self.storage is not None
        try:
            data = self.storage.get(name)
        except FileNotFoundError:
            return False
        except Exception as error:  # noqa: BLE001 - any storage failure only costs a cold compile
            log.warning("compile cache: cannot read %s (%s); compiling here", name, error)
            return False
        if torch.compiler.load_cache_artifacts(data) is None:  # corrupt or foreign: torch logs why
            log.warning("compile cache: cannot load %s; compiling here", name)
            return False
        log.info("compile cache: loaded %s (%d bytes)", name, len(data))
        return True

    def _store(self, name: str) -> None:
        assert self.storage is not None
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:  # nothing cacheable was generated (an eager or aot_eager backend)
            return
        try:
            self.storage.put(name, saved[0])
        except Exception as error:  # noqa: BLE001 - the fleet compiles again, nothing else is lost
            log.warning("compile cache: cannot store %s (%s)", name, error)
            return
        log.info("compile cache: stored %s (%d bytes)", name, len(saved[0]))
