"""One render: a base model (SD 1.5 or SDXL), one or more ControlNets, a prompt and a list of seeds in, images out.

The pipeline object is assembled per call from models the cache holds (about 0.5 ms, nothing reloaded),
so swapping ControlNets between tasks is free once each is resident.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    UniPCMultistepScheduler,
)

from shared.errors import InvalidInput
from shared.registry import SCHEDULERS
from workers.engine.compile import CompileOptions
from workers.engine.hints import hints_once
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
    """One ControlNet unit of a render of one prompt: the net, its settings and its control map."""

    model: str  # ControlNet ref (preset, alias, hub id, local folder)
    image: PIL.Image.Image  # preprocessed control map, RGB, exactly width×height
    scale: float  # controlnet_conditioning_scale
    start: float  # control_guidance_start, fraction of the steps
    end: float  # control_guidance_end, fraction of the steps


@dataclass(frozen=True)
class Unit:
    """One ControlNet of a call's stack, with the settings every image of the call shares."""

    model: str
    scale: float
    start: float
    end: float


@dataclass(frozen=True)
class Item:
    """One image of a call: its prompts, its seed and its control map for each unit (in unit order). Items of
    one call may come from different plans, styles and tasks."""

    prompt: str
    negative_prompt: str
    seed: int
    maps: tuple[PIL.Image.Image, ...]
    init: PIL.Image.Image | None = None
    """The image an image-to-image or inpainting call starts from (a final's enlarged draft, a revision's
    parent), at the call's size."""
    mask: PIL.Image.Image | None = None
    """Inpainting: white where the image is rendered anew (a revision's region and band)."""


@dataclass(frozen=True)
class Request:
    """One pipeline call: the stack, resolved (every unit names its ControlNet), the sizes and sampler settings
    every image shares, and one item per image.

    `vae` replaces the base's VAE, `quantize` ("int8") loads the ControlNets quantised, `compile` runs the UNet
    and ControlNets compiled (batches padded to a bucket), and `skip_outside_window` skips each ControlNet at
    the steps where its scale is 0 (False runs diffusers' own stack, for comparison)."""

    base: str
    units: Sequence[Unit]
    items: Sequence[Item]
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str = "default"
    vae: str | None = None
    quantize: str | None = None
    compile: CompileOptions | None = None
    skip_outside_window: bool = True
    output_type: str = "pil"
    strength: float | None = None
    """Image-to-image: how much of each item's `init` is rendered again (1: all of it); None renders from noise.
    With masks, inpainting: only the masked part of each `init` is rendered again, at this strength."""
    modes: tuple[int, ...] | None = None
    """A ControlNet-Union stack: every unit names the same union model, and runs as its mode here (in unit
    order), all in one pass of the network per step."""


@dataclass(frozen=True)
class RenderResult:
    """Images, one per item (or seed) in the order given (PIL, or HxWx3 float arrays in [0, 1] for "np"), and
    the scheduler actually used, as {"class": name, "config": JSON-safe dict}, to record with them."""

    images: list[PIL.Image.Image] | list[np.ndarray]
    scheduler: dict[str, Any]


def render(
    cache: ModelCache,
    *,
    controls: Sequence[ControlInput],
    prompt: str,
    negative_prompt: str,
    seeds: Sequence[int],
    on_step: Callable[[int, int], None] | None = None,
    **settings: Any,
) -> RenderResult:
    """One prompt and one control map per unit, one image per seed: `render_batch` of a single task."""
    units = [Unit(c.model, c.scale, c.start, c.end) for c in controls]
    maps = tuple(c.image for c in controls)
    items = [Item(prompt, negative_prompt, seed, maps) for seed in seeds]
    return render_batch(cache, Request(units=units, items=items, **settings), on_step)


def render_batch(
    cache: ModelCache, request: Request, on_step: Callable[[int, int], None] | None = None
) -> RenderResult:
    """Render one image per item of `request`, in one pipeline call when memory allows.

    The base's family (SD 1.5 or SDXL, from its config) picks the pipeline class. Compiled modules are made
    once per process (`ModelCache.compiled`). Skipping is plain Python between compiled modules, so it holds
    compiled too: with CUDA graphs, each net is its own graph, replayed only at the steps inside its window.

    Each item keeps its own starting noise (a CPU generator seeded with its seed), so an image depends on its
    batch only through the kernels' arithmetic: within 1/255 of its render alone, and bitwise the same when
    alone. Prompts are encoded once per process and prompt pair (`ModelCache.prompt_embeddings`).

    A batch that runs out of GPU memory is rendered again in halves, down to one image, so the images come back
    in item order; one that does not fit alone raises torch.OutOfMemoryError. `on_step(step, total)` follows
    the denoising loop in the asked-for steps: total is `steps` and step runs up to it, also under PNDM (SD
    1.5's default), which runs one timestep more; a split batch reports each part's steps.

    With `strength`, each item starts from its `init` image (diffusers' ControlNet image-to-image pipelines
    over the same resident modules): noised to `strength` and denoised with the same ControlNets, so the
    picture keeps the init's composition and runs about `strength × steps` steps.
    """
    units, items, compile = request.units, request.items, request.compile
    _check(units, items, request.width, request.height, request.scheduler, request.output_type, request.strength)
    components = cache.base(request.base)
    if request.vae is not None:
        components = {**components, "vae": cache.vae(request.vae)}
    union = request.modes is not None
    nets = cache.controlnets([units[0].model] if union else [unit.model for unit in units], request.quantize)
    _check_fits(request.base, components, units[: len(nets)], nets)
    cache.note_stack((request.base, request.vae or "", request.quantize or "", *(unit.model for unit in units)))
    if compile is not None:
        components = {**components, "unet": cache.compiled(components["unet"], compile)}
        nets = [cache.compiled(net, compile) for net in nets]
    stack = nets[0] if union else (WindowedControlNets if request.skip_outside_window else MultiControlNetModel)(nets)
    chosen = _fresh_scheduler(components["scheduler"], request.scheduler)
    # Known from the loaded modules, so pipeline class and components cannot disagree.
    pipeline_class = (_UNION_PIPELINES if union else _PIPELINES)["text_encoder_2" in components, _mode(request)]
    modes = {"control_mode": list(request.modes)} if request.modes is not None else {}
    guided = request.guidance_scale > 1 and components["unet"].config.time_cond_proj_dim is None

    def run(chunk: Sequence[Item]) -> list[Any]:
        # A scheduler per call, as each keeps per-call state (timesteps, step index).
        pipe = _pipeline(pipeline_class, {**components, "scheduler": copy.deepcopy(chosen)}, stack)
        # CPU generators: the starting noise then depends on the seed alone, not on the device or the batch.
        generators = [torch.Generator(device="cpu").manual_seed(item.seed) for item in chunk]
        with torch.inference_mode(), hints_once([] if union else nets), _vae_dtype_kept(components["vae"]):
            output = pipe(
                **_embeddings(cache, pipe, chunk, guided),
                **_inputs(pipe, chunk, request.strength, union),
                **modes,
                controlnet_conditioning_scale=[unit.scale for unit in units],
                control_guidance_start=[unit.start for unit in units],
                control_guidance_end=[unit.end for unit in units],
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                width=request.width,
                height=request.height,
                num_images_per_prompt=1,
                generator=generators,
                output_type=request.output_type,
                callback_on_step_end=None if on_step is None else _step_callback(on_step, request.steps),
            )
        return list(output.images)

    # Compiled code is specialised to its batch size: pad to a bucket with copies of the last item (their
    # images are dropped), so a job's last, short call reuses a compiled bucket instead of compiling anew.
    filler = [items[-1]] * (cache.bucket(compiled_shape(request), len(items)) - len(items)) if compile else []
    config = json.loads(chosen.to_json_string())
    return RenderResult(
        images=_halving_on_oom(run, [*items, *filler], cache.device)[: len(items)],
        scheduler={
            "class": type(chosen).__name__,
            "config": {key: value for key, value in config.items() if not key.startswith("_")},
        },
    )


def compiled_shape(request: Request) -> tuple[object, ...]:
    """What a compiled call's graphs depend on besides its batch size: the stack, the size, the sampler (its
    timestep dtype), guidance on or off (the UNet's batch) and how it is compiled."""
    stack = (request.base, request.vae, request.quantize, *(unit.model for unit in request.units), request.modes)
    return (stack, request.width, request.height, request.scheduler, request.guidance_scale > 1, request.compile)


def _images(chunk: Sequence[Item]) -> list[PIL.Image.Image | np.ndarray]:
    """The call's control maps as both pipelines take them for a MultiControlNetModel (always used, also for one
    unit): per unit, the one map every item shares (the pipeline repeats it, as it always has for a task's
    seeds), or a batch of one map per item, converted exactly as diffusers converts a PIL image (the SDXL
    pipeline refuses nested lists of images)."""
    images: list[PIL.Image.Image | np.ndarray] = []
    for unit, shared in enumerate(chunk[0].maps):
        maps = [item.maps[unit] for item in chunk]
        if all(m is shared for m in maps):
            images.append(shared)
        else:
            images.append(np.stack([np.array(m).astype(np.float32) / 255.0 for m in maps]))
    return images


def _mode(request: Request) -> str:
    """Which pipeline a call needs: from noise (`text`), from each item's start (`image`), or only within each
    item's mask (`inpaint`)."""
    if request.strength is None:
        return "text"
    return "inpaint" if request.items[0].mask is not None else "image"


def _inputs(pipe: DiffusionPipeline, chunk: Sequence[Item], strength: float | None, union: bool) -> dict[str, Any]:
    """The call's images as its pipeline names them: the control maps alone (a union's text-to-image pipeline
    calls them `control_image`); or the items' starting latents, the maps as `control_image`, and the strength;
    or, inpainting, the starting images and their masks."""
    if strength is None:
        return {"control_image" if union else "image": _images(chunk)}
    if chunk[0].mask is not None:
        starts = {"image": [item.init for item in chunk], "mask_image": [item.mask for item in chunk]}
        return {**starts, "control_image": _images(chunk), "strength": strength}
    return {"image": _start_latents(pipe, chunk), "control_image": _images(chunk), "strength": strength}


def _start_latents(pipe: DiffusionPipeline, chunk: Sequence[Item]) -> torch.Tensor:
    """Each item's start encoded by the VAE as the posterior's mean, scaled as diffusers scales latents (given
    latents, the image-to-image pipelines take them as they are). diffusers would sample the posterior with the
    item's generator instead: noise that is negligible for a trained VAE, larger than the picture itself for
    an untrained one, and never part of the draft's composition. An fp16 VAE that overflows (SDXL's) encodes
    in float32, as diffusers does; the call gives it back in its dtype (`_vae_dtype_kept`)."""
    vae = pipe.vae
    if vae.config.force_upcast and vae.dtype == torch.float16:
        vae.to(dtype=torch.float32)
    images = pipe.image_processor.preprocess([item.init for item in chunk])
    latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    return (latents * vae.config.scaling_factor).to(pipe.unet.dtype)


def _embeddings(cache: ModelCache, pipe: DiffusionPipeline, chunk: Sequence[Item], guided: bool) -> dict[str, Any]:
    """The call's prompt embeddings, stacked from each item's pair, encoded once per process and pair: the same
    tensors the pipeline would have made, without the text encoders running for every task."""
    pairs = [cache.prompt_embeddings(pipe, item.prompt, item.negative_prompt, guided) for item in chunk]
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    stacked: dict[str, Any] = {}
    for index, name in enumerate(names[: len(pairs[0])]):
        tensors = [pair[index] for pair in pairs]
        if all(tensor is not None for tensor in tensors):
            stacked[name] = torch.cat(tensors)  # type: ignore[arg-type]
    return stacked


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


class _ResidentSDImg2Img(_Resident, StableDiffusionControlNetImg2ImgPipeline):
    pass


class _ResidentSDXLImg2Img(_Resident, StableDiffusionXLControlNetImg2ImgPipeline):
    pass


class _ResidentSDInpaint(_Resident, StableDiffusionControlNetInpaintPipeline):
    pass


class _ResidentSDXLInpaint(_Resident, StableDiffusionXLControlNetInpaintPipeline):
    pass


class _ResidentSDXLUnion(_Resident, StableDiffusionXLControlNetUnionPipeline):
    pass


class _ResidentSDXLUnionImg2Img(_Resident, StableDiffusionXLControlNetUnionImg2ImgPipeline):
    pass


class _ResidentSDXLUnionInpaint(_Resident, StableDiffusionXLControlNetUnionInpaintPipeline):
    pass


_PIPELINES: dict[tuple[bool, str], type[DiffusionPipeline]] = {
    (False, "text"): _ResidentSD,
    (True, "text"): _ResidentSDXL,
    (False, "image"): _ResidentSDImg2Img,
    (True, "image"): _ResidentSDXLImg2Img,
    (False, "inpaint"): _ResidentSDInpaint,
    (True, "inpaint"): _ResidentSDXLInpaint,
}
"""By (SDXL, `_mode`)."""
_UNION_PIPELINES: dict[tuple[bool, str], type[DiffusionPipeline]] = {
    (True, "text"): _ResidentSDXLUnion,
    (True, "image"): _ResidentSDXLUnionImg2Img,
    (True, "inpaint"): _ResidentSDXLUnionInpaint,
}
"""A ControlNet-Union stack's, by (SDXL, `_mode`): SDXL only."""
_SDXL = (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
)


def _pipeline(
    pipeline_class: type[DiffusionPipeline], components: dict[str, Any], stack: torch.nn.Module
) -> DiffusionPipeline:
    """The ControlNet pipeline over cached modules: about 0.5 ms, nothing loaded or copied."""
    extra: dict[str, Any]
    if issubclass(pipeline_class, _SDXL):
        extra = {"add_watermarker": False}  # the output must not depend on whether a watermark package is installed
    else:
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = pipeline_class(**components, controlnet=stack, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _vae_dtype_kept(vae: torch.nn.Module) -> Iterator[None]:
    """Give the VAE back in the dtype it had, whatever happened in the call: diffusers' SDXL pipelines upcast
    an fp16 VAE to float32 to decode and cast it back only after a decode that succeeded, so a decode that ran
    out of memory would leave the shared VAE in float32 and every later call failing on mixed dtypes."""
    dtype = next(vae.parameters()).dtype
    try:
        yield
    finally:
        if next(vae.parameters()).dtype != dtype:
            vae.to(dtype=dtype)


CAPTURE_FAILURES = ("cudaErrorStreamCaptureInvalidated", "operation failed due to a previous error during capture")
"""How running out of memory while a CUDA graph is being captured can surface (pytorch#159594): as a capture
error, not as torch.OutOfMemoryError."""


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` means the device ran out of memory, during a CUDA graph capture included."""
    return isinstance(error, torch.OutOfMemoryError) or any(text in str(error) for text in CAPTURE_FAILURES)


def _halving_on_oom(run: Callable[[Sequence[Item]], list[Any]], items: list[Item], device: torch.device) -> list[Any]:
    """`run(items)`, or, when that runs out of memory, `run` on each half of the items, recursively."""
    try:
        return run(items)
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        if len(items) == 1:
            raise torch.OutOfMemoryError(
                f"out of memory on {device} rendering a single image; lower the resolution or the number of "
                f"ControlNets, or use a larger GPU ({str(error).splitlines()[0]})"
            ) from error
    # Retried outside the except block, so the failed attempt's tensors (held by the traceback) are freed.
    log.warning("out of memory on %s with %d images in one batch; rendering them in halves", device, len(items))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = (len(items) + 1) // 2
    return _halving_on_oom(run, items[:half], device) + _halving_on_oom(run, items[half:], device)


def _check(
    units: Sequence[Unit],
    items: Sequence[Item],
    width: int,
    height: int,
    scheduler: str,
    output_type: str,
    strength: float | None = None,
) -> None:
    """Refuse what the pipeline would silently reinterpret (resizing control maps) or fail on deep inside."""
    if not units:
        raise InvalidInput("a render needs at least one ControlNet")
    if not items:
        raise InvalidInput("a render needs at least one seed")
    if scheduler not in SCHEDULERS:
        raise InvalidInput(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}")
    if output_type not in OUTPUT_TYPES:
        raise InvalidInput(f"unknown output type {output_type!r}; one of {', '.join(OUTPUT_TYPES)}")
    if strength is not None and not 0 < strength <= 1:
        raise InvalidInput(f"strength {strength} is outside (0, 1]")
    if any((item.mask is None) != (items[0].mask is None) for item in items):
        raise InvalidInput("a call inpaints every image or none")
    for item in items:
        if strength is not None and (item.init is None or item.init.size != (width, height)):
            raise InvalidInput(f"an image-to-image render needs every image's start at {width}×{height}")
        if item.mask is not None and (strength is None or item.mask.size != (width, height)):
            raise InvalidInput(f"inpainting needs a strength and every image's mask at {width}×{height}")
        if len(item.maps) != len(units):
            raise InvalidInput(f"an image has {len(item.maps)} control maps for {len(units)} ControlNets")
        for unit, image in zip(units, item.maps, strict=True):
            if image.size != (width, height) or image.mode != "RGB":
                raise InvalidInput(
                    f"control map for {unit.model!r} is {image.mode} {image.size[0]}×{image.size[1]}; the render "
                    f"needs RGB {width}×{height}"
                )


def _check_fits(base: str, components: dict[str, Any], units: Sequence[Unit], nets: Sequence[ControlNetModel]) -> None:
    """Refuse a ControlNet or VAE made for another architecture (an SD 1.5 net under SDXL, say) with one line,
    rather than a shape error from deep inside the first step."""
    unet = components["unet"].config
    if components["vae"].config.latent_channels != unet.in_channels:
        raise InvalidInput(f"the VAE's {components['vae'].config.latent_channels} latent channels do not fit {base!r}")
    for unit, net in zip(units, nets, strict=True):
        wants = (net.config.cross_attention_dim, net.config.addition_embed_type)
        if wants != (unet.cross_attention_dim, unet.addition_embed_type):
            raise InvalidInput(f"ControlNet {unit.model!r} is made for another kind of base model than {base!r}")


def _fresh_scheduler(shared: SchedulerMixin, name: str) -> SchedulerMixin:
    """A scheduler of its own for this call: schedulers keep per-call state (timesteps, step index)."""
    cls = type(shared) if name == "default" else _SCHEDULERS[name]
    return cls.from_config(shared.config)


def _step_callback(on_step: Callable[[int, int], None], steps: int) -> Callable[..., dict[str, Any]]:
    """Progress in the profile's steps: PNDM (SD 1.5's default) runs one timestep more than asked, and a user
    who asked for 8 steps should not read `step 9/9`."""

    def callback(pipe: DiffusionPipeline, index: int, _timestep: Any, _tensors: Any) -> dict:
        on_step(math.ceil((index + 1) * steps / pipe.num_timesteps), steps)
        return {}  # nothing to replace in the pipeline's state

    return callback
