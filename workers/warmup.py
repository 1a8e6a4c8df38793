"""Compiling a profile's stack ahead of its jobs: `archfarm warmup` for the fleet, `archfarm worker --warm` for
one worker.

`archfarm warmup` runs on a machine with the fleet's torch version and GPU model, against the farm's storage:
each requested batch size is rendered once on blank control maps, and what inductor generated is stored in
the farm's compile cache (`workers.engine.compile_cache`), where every worker looks before its first compiled
call. That cache holds generated code, not dynamo's tracing nor CUDA graphs, so a worker's first call of a
bucket still traces and captures: a worker started with `--warm` does that for every bucket in its pool
process before it takes a task, so its first task replays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.config import Settings
from shared.limits import batch_cap
from shared.spec import Profile
from shared.storage import open_storage_from_settings
from workers.engine.batching import BUCKETS, padded
from workers.renderer import Renderer, compile_options


@dataclass(frozen=True)
class Warmed:
    images: int
    """The batch bucket compiled (a requested size rounded up to its bucket)."""
    state: str
    """`cold` (compiled here and stored), `warm` (already in the fleet's cache), `compiled` (done earlier in
    this run, for another requested size of the same bucket)."""
    seconds: float


def warmup(profile: Profile, batches: list[int] | None, settings: Settings) -> tuple[str, list[Warmed]]:
    """This machine's device, and each batch bucket's first compiled call on it (`warm`)."""
    renderer = Renderer(settings, open_storage_from_settings(settings))
    return str(renderer.device), warm(renderer, profile, batches, settings)


def warm(renderer: Renderer, profile: Profile, batches: list[int] | None, settings: Settings) -> list[Warmed]:
    """Each batch bucket's first compiled call on the renderer's device. No buckets when the profile does not
    compile there (`compile: auto` on a CPU). Default: every bucket up to what `batch: auto` chooses there,
    since a job's tails and a worker's shared calls use the smaller ones too."""
    if compile_options(profile, renderer.device) is None:
        return []
    largest = renderer.images_per_call(profile, batch_cap(profile, settings))
    sizes = batches or [b for b in BUCKETS if b <= largest]
    warmed = []
    # Smallest first: a call replays the smallest compiled bucket that holds it, so a larger bucket warmed
    # first would serve the smaller sizes instead of their own buckets being compiled.
    for images in sorted(sizes, key=padded):
        started = time.perf_counter()
        warmth = renderer.warm(profile, padded(images))
        assert warmth is not None  # the profile compiles here
        warmed.append(Warmed(padded(images), warmth.state, time.perf_counter() - started))
    return warmed
