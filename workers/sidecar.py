"""The JSON written beside every image: enough to reproduce it and to audit where it came from."""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

_PACKAGES = (
    "archfarm",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "numpy",
    "pillow",
    "opencv-python-headless",
)


@cache
def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def sidecar(
    *,
    job: dict[str, Any],
    task_id: str,
    key: str,
    batch_seeds: list[int],
    plan: dict[str, Any],
    style: dict[str, Any],
    seed: int,
    profile: dict[str, Any],
    models: dict[str, Any],
    scheduler: dict[str, Any],
    device: str,
    threads: int,
    timings: dict[str, float],
    image_sha256: str,
    call: dict[str, int],
) -> dict[str, Any]:
    return {
        "format": "archfarm.sidecar/1",
        "job": job,
        "task": task_id,
        "key": key,
        # The task's seeds, rendered together: a re-render repeats them, bitwise the same on a CPU when the
        # call held this task alone (`call`), within 1/255 when it shared the call with other tasks.
        "batch_seeds": batch_seeds,
        "call": call,
        "plan": plan,
        "style": style,
        "seed": seed,
        "profile": profile,
        "models": models,
        "scheduler": scheduler,
        "device": device,
        # CPU kernels split their sums over this many threads: the same count reproduces an image bitwise.
        "threads": threads,
        "image_sha256": image_sha256,
        "versions": library_versions(),
        "timings": timings,
    }
