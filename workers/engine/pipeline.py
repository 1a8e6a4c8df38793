"""One render: a base model, one or more ControlNets, a prompt and a list of seeds in, images out.

The pipeline object is assembled per call from models the cache holds (about 0.5 ms, nothing reloaded),
so swapping ControlNets between tasks is free once each is resident.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    MultiControlNetModel,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionControlNetPipeline,
    UniPCMultistepScheduler,
)

from shared.errors import InvalidInput
from workers.engine.models import ModelCache

# "default" keeps the base model's own scheduler class; the others replace it, keeping its betas.
_SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "unipc": UniPCMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,  # its defaults (dpmsolver++, order 2) are DPM++ 2M
    "pndm": PNDMScheduler,
}
SCHEDULER_NAMES: tuple[str, ...] = ("default", *_SCHEDULERS)

OUTPUT_TYPES = ("pil", "np")


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet unit of a render."""

    model: str  # ControlNet ref (preset, alias, hub id, local folder)
    image: PIL.Image.Image  # preprocessed control map, RGB, exactly width×height
    scale: float  # controlnet_conditioning_scale
    start: float  # control_guidance_start, fraction of the steps
    end: float  # control_guidance_end, fraction of the steps


@dataclass(frozen=True)
class RenderResult:
    """Images, one per seed in the order given (PIL, or HxWx3 float arrays in [0, 1] for "np"), and the
    scheduler actually used, as {"class": name, "config": JSON-safe dict}, to record with them."""

    images: list[PIL.Image.Image] | list[np.ndarray]
    scheduler: dict[str, Any]


def render(
    cache: ModelCache,
    *,
    base: str,
    controls: Sequence[ControlInput],
    prompt: str,
    negative_prompt: str,
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
    width: int,
    height: int,
    scheduler: str = "default",
    on_step: Callable[[int, int], None] | None = None,
    output_type: str = "pil",
) -> RenderResult:
    """Render one image per seed, all in one pipeline call.

    `on_step(step, total)` follows the denoising loop: step runs 1..total, and total is the scheduler's
    number of timesteps, which is `steps` for most but `steps + 1` for PNDM (SD 1.5's default).
    """
    _check(controls, seeds, width, height, scheduler, output_type)
    components = cache.base(base)
    units = [cache.controlnet(control.model) for control in controls]
    cache.note_stack((base, *(control.model for control in controls)))
    pipe = StableDiffusionControlNetPipeline(
        **{**components, "scheduler": _fresh_scheduler(components["scheduler"], scheduler)},
        controlnet=units[0] if len(units) == 1 else MultiControlNetModel(units),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def unit_args(values: list[Any]) -> Any:
        # The single-ControlNet pipeline takes scalars, MultiControlNetModel one entry per unit.
        return values[0] if len(values) == 1 else values

    # CPU generators: the starting noise then depends on the seed alone, not on the device that renders.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        output = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=unit_args([control.image for control in controls]),
            controlnet_conditioning_scale=unit_args([control.scale for control in controls]),
            control_guidance_start=unit_args([control.start for control in controls]),
            control_guidance_end=unit_args([control.end for control in controls]),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            num_images_per_prompt=len(seeds),
            generator=generators,
            output_type=output_type,
            callback_on_step_end=None if on_step is None else _step_callback(on_step),
        )
    images = output.images if output_type == "pil" else list(output.images)
    config = json.loads(pipe.scheduler.to_json_string())
    return RenderResult(
        images=images,
        scheduler={
            "class": type(pipe.scheduler).__name__,
            "config": {key: value for key, value in config.items() if not key.startswith("_")},
        },
    )


def _check(
    controls: Sequence[ControlInput],
    seeds: Sequence[int],
    width: int,
    height: int,
    scheduler: str,
    output_type: str,
) -> None:
    """Refuse what the pipeline would silently reinterpret (resizing control maps) or fail on deep inside."""
    if not controls:
        raise InvalidInput("a render needs at least one ControlNet")
    if not seeds:
        raise InvalidInput("a render needs at least one seed")
    if scheduler not in SCHEDULER_NAMES:
        raise InvalidInput(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULER_NAMES)}")
    if output_type not in OUTPUT_TYPES:
        raise InvalidInput(f"unknown output type {output_type!r}; one of {', '.join(OUTPUT_TYPES)}")
    for control in controls:
        if control.image.size != (width, height) or control.image.mode != "RGB":
            raise InvalidInput(
                f"control map for {control.model!r} is {control.image.mode} {control.image.size[0]}×"
                f"{control.image.size[1]}; the render needs RGB {width}×{height}"
            )


def _fresh_scheduler(shared: SchedulerMixin, name: str) -> SchedulerMixin:
    """A scheduler of its own for this call: schedulers keep per-call state (timesteps, step index)."""
    cls = type(shared) if name == "default" else _SCHEDULERS[name]
    return cls.from_config(shared.config)


def _step_callback(on_step: Callable[[int, int], None]) -> Callable[..., dict[str, Any]]:
    def callback(pipe: StableDiffusionControlNetPipeline, index: int, _timestep: Any, _tensors: Any) -> dict:
        on_step(index + 1, pipe.num_timesteps)
        return {}  # nothing to replace in the pipeline's state

    return callback
