"""How many images one pipeline call renders: sized for the device from what calls have really taken.

A GPU renders a batch of 8–16 SD 1.5 images in little more time than one (the host issuing kernels sets the
pace of small calls), so a worker fills each call with several tasks. How many fit depends on free device
memory and on the stack's memory per image, which a worker measures on its own calls (a prior from the
published figures stands in until then). On a CPU batching does not pay: a call renders one task.
"""

from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes a worker uses: few distinct shapes, so compiled graphs are reused."""
PRIOR_BYTES_PER_MEGAPIXEL = 4 * 2**30
"""Per image, before a worker has measured its stack: SD 1.5 + 2 ControlNets took 0.53 GiB per 512² image and
SDXL + 1 ControlNet 3.9 GiB per 1024² image on an H200 (fp16), i.e. 2–3.7 GiB per megapixel."""
USABLE = 0.8
"""Share of the free device memory a batch may take: the rest absorbs fragmentation and other stacks."""


def bucket(images: int) -> int:
    """The largest bucket not above `images` (at least 1)."""
    return max([b for b in BUCKETS if b <= images] or [1])


def padded(images: int) -> int:
    """The smallest bucket holding `images`: what a compiled call renders, so each bucket compiles once (beyond
    the largest bucket, `images` itself)."""
    return min([b for b in BUCKETS if b >= images] or [images])


def images_that_fit(free_bytes: int, bytes_per_image: float, cap: int) -> int:
    """Images per call: as many as fit in the usable free memory, within `cap`, rounded down to a bucket."""
    fit = int(free_bytes * USABLE // max(bytes_per_image, 1.0))
    return bucket(max(1, min(cap, fit)))


class BatchSizer:
    """One per worker: images per call for each stack and size, learning each one's memory per image."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._per_image: dict[tuple[object, ...], float] = {}

    def images(self, stack: tuple[object, ...], megapixels: float, cap: int, auto: bool, one_task: int) -> int:
        """For `batch: auto`: one task's images on a CPU; on a GPU what fits (measured, else the prior), within
        `cap`. For a number: `cap`, which is that number."""
        if not auto:
            return cap
        if self.device.type != "cuda":
            return one_task
        free, _ = torch.cuda.mem_get_info(self.device)
        reusable = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        per_image = self._per_image.get(stack, megapixels * PRIOR_BYTES_PER_MEGAPIXEL)
        return images_that_fit(free + reusable, per_image, cap)

    def start(self) -> None:
        """Mark the start of a call, so `measure` sees only its own peak."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def measure(self, stack: tuple[object, ...], images: int) -> None:
        """Learn the memory per image from the call that just ended (the largest seen wins: a safe estimate):
        its peak above what stays allocated after it, so models the call loaded, which stay resident, are not
        counted as memory per image."""
        if self.device.type != "cuda" or images < 1:
            return
        used = (torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)) / images
        self._per_image[stack] = max(used, self._per_image.get(stack, 0.0))
