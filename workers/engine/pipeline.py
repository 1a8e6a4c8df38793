"""One render: a base model (SD 1.5 or SDXL), one or more ControlNets, a prompt and a list of seeds in, images out.

The pipeline object is assembled per call from models the cache holds (about 0.5 ms, nothing reloaded),
so swapping ControlNets between tasks is free once each is resident.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    MultiControlNetModel,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UniPCMultistepScheduler,
)

from shared.errors import InvalidInput
from shared.registry import SCHEDULERS
from workers.engine.compile import CompileOptions
from workers.engine.models import ModelCache
from workers.engine.windows import WindowedControlNets

log = logging.getLogger(__name__)

# "default" keeps the base model's own scheduler class; the others replace it, keeping its betas.
_SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "unipc": UniPCMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,  # its defaults (dpmsolver++, order 2) are DPM++ 2M
    "pndm": PNDMScheduler,
}
if ("default", *_SCHEDULERS) != SCHEDULERS:  # the names jobs may use live in shared/, the classes here
    raise RuntimeError("workers.engine.pipeline._SCHEDULERS out of step with shared.registry.SCHEDULERS")

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
    vae: str | None = None,
    quantize: str | None = None,
    compile: CompileOptions | None = None,
    skip_outside_window: bool = True,
) -> RenderResult:
    """Render one image per seed, in one pipeline call when memory allows.

    The base's family (SD 1.5 or SDXL, from its config) picks the pipeline class. `vae` replaces the base's
    VAE, `quantize` ("int8") loads the ControlNets quantised, `compile` runs the UNet and ControlNets compiled
    (once per process, see `ModelCache.compiled`), and `skip_outside_window` skips each ControlNet at the steps
    where its scale is 0 (bitwise the same images; False runs diffusers' own stack, for comparison).

    A batch that runs out of GPU memory is rendered again in halves, down to one seed, so the images come back
    as batched ones do (each within 1/255 of its one-seed render), in seed order; one seed that does not fit
    raises torch.OutOfMemoryError. `on_step(step, total)` follows the denoising loop: step runs 1..total, and
    total is the scheduler's number of timesteps, which is `steps` for most but `steps + 1` for PNDM (SD 1.5's
    default); a split batch reports each part's steps.
    """
    _check(controls, seeds, width, height, scheduler, output_type)
    components = cache.base(base)
    if vae is not None:
        components = {**components, "vae": cache.vae(vae)}
    nets = cache.controlnets([control.model for control in controls], quantize)
    _check_fits(base, components, controls, nets)
    cache.note_stack((base, vae or "", quantize or "", *(control.model for control in controls)))
    if compile is not None:
        components = {**components, "unet": cache.compiled(components["unet"], compile)}
        nets = [cache.compiled(net, compile) for net in nets]
    stack = (WindowedControlNets if skip_outside_window else MultiControlNetModel)(nets)
    chosen = _fresh_scheduler(components["scheduler"], scheduler)
    # Known from the loaded modules, so pipeline class and components cannot disagree.
    pipeline_class = _ResidentSDXL if "text_encoder_2" in components else _ResidentSD

    def run(chunk: Sequence[int]) -> list[Any]:
        # A scheduler per call, as each keeps per-call state (timesteps, step index).
        pipe = _pipeline(pipeline_class, {**components, "scheduler": copy.deepcopy(chosen)}, stack)
        # CPU generators: the starting noise then depends on the seed alone, not on the device that renders.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in chunk]
        with torch.inference_mode():
            output = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                # Lists, one entry per unit, also for one unit: the stack is always a MultiControlNetModel.
                image=[control.image for control in controls],
                controlnet_conditioning_scale=[control.scale for control in controls],
                control_guidance_start=[control.start for control in controls],
                control_guidance_end=[control.end for control in controls],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                width=width,
                height=height,
                num_images_per_prompt=len(chunk),
                generator=generators,
                output_type=output_type,
                callback_on_step_end=None if on_step is None else _step_callback(on_step),
            )
        return list(output.images)

    config = json.loads(chosen.to_json_string())
    return RenderResult(
        images=_halving_on_oom(run, list(seeds), cache.device),
        scheduler={
            "class": type(chosen).__name__,
            "config": {key: value for key, value in config.items() if not key.startswith("_")},
        },
    )


class _Resident:
    """A pipeline over resident models: their device is known, so diffusers' walk over every module looking
    for offloading hooks, which it repeats on each use of `_execution_device` (about 6 ms a call on a tiny
    model, more on real ones), is skipped. archfarm never offloads a module inside a call."""

    unet: torch.nn.Module

    @property
    def _execution_device(self) -> torch.device:
        return self.unet.device  # type: ignore[return-value]


class _ResidentSD(_Resident, StableDiffusionControlNetPipeline):
    pass


class _ResidentSDXL(_Resident, StableDiffusionXLControlNetPipeline):
    pass


def _pipeline(
    pipeline_class: type[DiffusionPipeline], components: dict[str, Any], stack: MultiControlNetModel
) -> DiffusionPipeline:
    """The ControlNet pipeline over cached modules: about 0.5 ms, nothing loaded or copied."""
    extra: dict[str, Any]
    if issubclass(pipeline_class, StableDiffusionXLControlNetPipeline):
        extra = {"add_watermarker": False}  # the output must not depend on whether a watermark package is installed
    else:
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = pipeline_class(**components, controlnet=stack, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _halving_on_oom(run: Callable[[Sequence[int]], list[Any]], seeds: list[int], device: torch.device) -> list[Any]:
    """`run(seeds)`, or, when that runs out of memory, `run` on each half of the seeds, recursively."""
    try:
        return run(seeds)
    except torch.OutOfMemoryError as error:
        if len(seeds) == 1:
            raise torch.OutOfMemoryError(
                f"out of memory on {device} rendering a single image; lower the resolution or the number of "
                f"ControlNets, or use a larger GPU ({str(error).splitlines()[0]})"
            ) from error
    # Retried outside the except block, so the failed attempt's tensors (held by the traceback) are freed.
    log.warning("out of memory on %s with %d seeds in one batch; rendering them in halves", device, len(seeds))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = (len(seeds) + 1) // 2
    return _halving_on_oom(run, seeds[:half], device) + _halving_on_oom(run, seeds[half:], device)


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
    if scheduler not in SCHEDULERS:
        raise InvalidInput(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}")
    if output_type not in OUTPUT_TYPES:
        raise InvalidInput(f"unknown output type {output_type!r}; one of {', '.join(OUTPUT_TYPES)}")
    for control in controls:
        if control.image.size != (width, height) or control.image.mode != "RGB":
            raise InvalidInput(
                f"control map for {control.model!r} is {control.image.mode} {control.image.size[0]}×"
                f"{control.image.size[1]}; the render needs RGB {width}×{height}"
            )


def _check_fits(
    base: str, components: dict[str, Any], controls: Sequence[ControlInput], nets: Sequence[ControlNetModel]
) -> None:
    """Refuse a ControlNet or VAE made for another architecture (an SD 1.5 net under SDXL, say) with one line,
    rather than a shape error from deep inside the first step."""
    unet = components["unet"].config
    if components["vae"].config.latent_channels != unet.in_channels:
        raise InvalidInput(f"the VAE's {components['vae'].config.latent_channels} latent channels do not fit {base!r}")
    for control, net in zip(controls, nets, strict=True):
        wants = (net.config.cross_attention_dim, net.config.addition_embed_type)
        if wants != (unet.cross_attention_dim, unet.addition_embed_type):
            raise InvalidInput(f"ControlNet {control.model!r} is made for another kind of base model than {base!r}")


def _fresh_scheduler(shared: SchedulerMixin, name: str) -> SchedulerMixin:
    """A scheduler of its own for this call: schedulers keep per-call state (timesteps, step index)."""
    cls = type(shared) if name == "default" else _SCHEDULERS[name]
    return cls.from_config(shared.config)


def _step_callback(on_step: Callable[[int, int], None]) -> Callable[..., dict[str, Any]]:
    def callback(pipe: DiffusionPipeline, index: int, _timestep: Any, _tensors: Any) -> dict:
        on_step(index + 1, pipe.num_timesteps)
        return {}  # nothing to replace in the pipeline's state

    return callback
