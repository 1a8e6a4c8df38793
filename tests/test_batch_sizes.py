"""How many images a call takes: the device's free memory over the stack's memory per image, in buckets, within
the profile's cap and the broker's visibility timeout; one task per call on a CPU."""

from __future__ import annotations

import pytest
import torch

from shared.config import Settings
from shared.limits import batch_cap, task_time_limit
from shared.spec import Profile
from workers.engine.batching import BatchSizer, bucket, images_that_fit

GIB = 2**30


@pytest.mark.parametrize(
    ("free", "per_image", "cap", "images"),
    [
        (130 * GIB, 0.53 * GIB, 16, 16),  # an H200 and SD 1.5 + 2 ControlNets at 512²: capped at 16
        (20 * GIB, 0.53 * GIB, 16, 16),  # 30 fit
        (8 * GIB, 0.53 * GIB, 16, 8),  # 12 fit: the bucket below
        (100 * GIB, 3.9 * GIB, 16, 16),  # SDXL at 1024² on an H200: 20 fit
        (20 * GIB, 3.9 * GIB, 16, 4),  # ... on a 24 GB card with 20 GB free: 4
        (2 * GIB, 3.9 * GIB, 16, 1),  # nothing fits: still one image (out of memory then fails clearly)
        (130 * GIB, 0.53 * GIB, 6, 4),  # a profile's `batch: 6`: the bucket below it
    ],
)
def test_images_that_fit(free: float, per_image: float, cap: int, images: int) -> None:
    assert images_that_fit(int(free), per_image, cap) == images


def test_buckets() -> None:
    assert [bucket(n) for n in (0, 1, 3, 4, 15, 16, 40, 100)] == [1, 1, 2, 4, 8, 16, 32, 64]


def test_a_cpu_renders_one_task_per_call_unless_told_otherwise() -> None:
    sizer = BatchSizer(torch.device("cpu"))
    assert sizer.images(("stack",), 0.26, cap=16, auto=True, one_task=2) == 2
    assert sizer.images(("stack",), 0.26, cap=4, auto=False, one_task=2) == 4


def profile(**changes: object) -> Profile:
    return Profile.model_validate({"base": "tiny-sd15", "controls": [{"kind": "canny"}], **changes})


def test_the_batch_cap_keeps_a_call_inside_the_visibility_timeout() -> None:
    settings = Settings(visibility_timeout=21600)
    assert batch_cap(profile(), settings) == 16  # auto: at most 16
    assert batch_cap(profile(batch=40), settings) == 40
    assert batch_cap(profile(batch=2, seeds_per_task=4), settings) == 4  # never less than a task
    big = profile(width=2048, height=2048, steps=150)  # 4,800 s per image, pessimistically
    assert batch_cap(big, settings) == 3 and task_time_limit(big, settings) < settings.visibility_timeout


def test_batch_is_not_part_of_what_an_image_is() -> None:
    assert profile(batch=8).digest() == profile().digest() == profile(batch="auto").digest()
    assert profile(steps=21).digest() != profile().digest()


def test_models_a_call_loads_are_not_counted_as_memory_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake device memory API: the call loads 3 GiB of weights that stay, and peaks 2 GiB above them."""
    gib = 2**30
    memory = {"allocated": 1 * gib, "peak": 1 * gib}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda _device: memory.update(peak=memory["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda _device: memory["peak"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda _device: memory["allocated"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device: (20 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda _device: memory["allocated"])
    sizer = BatchSizer(torch.device("cuda", 0))
    sizer.start()
    memory.update(allocated=4 * gib, peak=6 * gib)  # weights loaded, then 4 images' activations, freed
    sizer.measure(("stack",), 4)
    assert sizer.images(("stack",), 0.26, cap=64, auto=True, one_task=1) == 32  # 0.5 GiB per image: 16 GiB / 0.5
