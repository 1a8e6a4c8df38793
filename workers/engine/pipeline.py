"""One render: a base model (SD 1.5, SDXL, FLUX.1, FLUX.1 Control or SD 3), one or more ControlNets, a prompt and a
list of seeds in, images out.

The pipeline object is assembled per call from models the cache holds (about 0.5 ms, nothing reloaded),
so swapping ControlNets between tasks is free once each is resident.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    ControlNetModel,
    ControlNetUnionModel,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxControlPipeline,
    FluxMultiControlNetModel,
    MultiAdapter,
    MultiControlNetModel,
    PNDMScheduler,
    SchedulerMixin,
    SD3ControlNetModel,
    SD3MultiControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    T2IAdapter,
    UniPCMultistepScheduler,
)
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from shared.errors import InvalidInput
from shared.registry import SCHEDULERS, TRANSFORMER_FAMILIES, Family
from workers.engine.compile import CompileOptions
from workers.engine.hints import hints_once
from workers.engine.loras import Lora
from workers.engine.models import ModelCache, family_dtype
from workers.engine.moodboards import Board, IPAdapter
from workers.engine.windows import WindowedControlNets, WindowedFluxControlNets, WindowedSD3ControlNets

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
    text_encoders: str = "device"
    """`cpu`: the base's text encoders are held (and run, once per prompt pair) in CPU memory."""
    quantize_base: str | None = None
    """"int8": the base's denoiser (UNet or transformer) is loaded int8 weight-only."""
    lora: Lora | None = None
    """A style pack's LoRA, swapped into the UNet for this call (`workers.engine.loras`); every item's style
    shares it."""
    board: Board | None = None
    """A style pack's mood board, through the IP-Adapter at `ip_adapter` (`workers.engine.moodboards`); every
    item's style shares it."""
    ip_adapter: IPAdapter | None = None
    adapters: bool = False
    """The units are T2I-Adapters (SD 1.5, SDXL): run once per call, their features added at every step up to
    the units' common end."""
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

    The base's family (from its config) picks the pipeline class and how units map onto it: SD 1.5 and SDXL run
    one ControlNet per unit (or one ControlNet-Union with a mode per unit), FLUX.1 and SD 3 their own ControlNets
    (`FluxMultiControlNetModel`, `SD3MultiControlNetModel`), FLUX.1 Control takes its one unit's map as input
    channels of the base itself. Compiled modules are made
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
    family = cache.family(request.base)
    _check(family, request)
    components = cache.base(request.base, request.text_encoders, request.quantize_base)
    unet = components.get("unet")
    if unet is not None:  # before compiling: the compiled UNet wraps this module
        cache.loras.apply(unet, request.lora)
        if request.board is not None and request.ip_adapter is not None:
            cache.boards.load(unet, request.ip_adapter)
        elif request.adapters:  # a T2I-Adapter pipeline gives the UNet no image embeddings
            cache.boards.unload(unet)
    if request.vae is not None:
        components = {**components, "vae": cache.vae(request.vae)}
    union = request.modes is not None
    nets: list[torch.nn.Module] = []
    if family != "flux-control":  # a FLUX.1 Control base is its own control model
        refs = [units[0].model] if union else [unit.model for unit in units]
        nets = list(cache.controlnets(refs, request.quantize, family_dtype(cache.dtype, family)))
    _check_fits(family, request, components, nets)
    base = (request.base, request.text_encoders, request.quantize_base or "", request.vae or "")
    cache.note_stack((*base, request.quantize or "", *(unit.model for unit in units)))
    denoiser = "transformer" if family in TRANSFORMER_FAMILIES else "unet"
    if compile is not None:
        components = {**components, denoiser: cache.compiled(components[denoiser], compile)}
        nets = [cache.compiled(net, compile) for net in nets]
    stack = _stack(family, nets, union, request.skip_outside_window, request.adapters)
    chosen = _fresh_scheduler(components["scheduler"], request.scheduler)
    pipeline_class = _ADAPTER_PIPELINES[family] if request.adapters else _PIPELINES[family, union, _mode(request)]
    guided = _guided(family, components, request.guidance_scale)
    # What the pipeline calls the control maps: `image` in SD's plain ControlNet pipelines, where it is not the
    # image an image-to-image call starts from.
    plain_maps = family in ("sd15", "sdxl") and not union and request.strength is None
    steering = _adapted if request.adapters else _controls

    def run(chunk: Sequence[Item]) -> list[Any]:
        # A scheduler per call, as each keeps per-call state (timesteps, step index).
        pipe = _pipeline(pipeline_class, {**components, "scheduler": copy.deepcopy(chosen)}, stack)
        # CPU generators: the starting noise then depends on the seed alone, not on the device or the batch.
        generators = [torch.Generator(device="cpu").manual_seed(item.seed) for item in chunk]
        vae = components["vae"]
        maps_by_mean = _maps_by_mean(vae) if family in TRANSFORMER_FAMILIES else nullcontext()
        with torch.inference_mode(), hints_once(nets), _vae_dtype_kept(vae), maps_by_mean:
            output = pipe(
                **_embeddings(cache, family, pipe, chunk, guided),
                **_inputs(pipe, chunk, request.strength),
                **({} if unet is None else cache.boards.call_inputs(pipe, unet, request.board, len(chunk), guided)),
                **steering(family, units, chunk, request.modes, maps_as="image" if plain_maps else "control_image"),
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                width=request.width,
                height=request.height,
                num_images_per_prompt=1,
                generator=generators,
                output_type=request.output_type,
                **_progress(on_step, request.steps, legacy=request.adapters),
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
    stack: tuple[object, ...] = (request.base, request.vae, request.quantize, request.quantize_base)
    stack += (*(unit.model for unit in request.units), request.modes, request.adapters)
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


def _controls(
    family: Family, units: Sequence[Unit], chunk: Sequence[Item], modes: tuple[int, ...] | None, maps_as: str
) -> dict[str, Any]:
    """How a call's units steer its pipeline: their maps (as `maps_as`), per unit a scale and a window (and a
    union's modes), or, for FLUX.1 Control, the one unit's maps as the pipeline's control image."""
    if family == "flux-control":
        return {"control_image": _images(chunk)[0]}
    return {
        maps_as: _images(chunk),
        **({"control_mode": list(modes)} if modes is not None else {}),
        "controlnet_conditioning_scale": [unit.scale for unit in units],
        "control_guidance_start": [unit.start for unit in units],
        "control_guidance_end": [unit.end for unit in units],
    }


def _adapted(
    family: Family, units: Sequence[Unit], chunk: Sequence[Item], modes: tuple[int, ...] | None, maps_as: str
) -> dict[str, Any]:
    """How a call's T2I-Adapters steer it: per unit a batch of maps (one per item, as tensors: the pipeline
    repeats only the prompt, so a shared map is repeated here) and a scale; SDXL's pipeline also takes the
    fraction of steps they act in (every unit's end, one value)."""
    maps = [torch.from_numpy(np.stack([np.asarray(item.maps[u]) for item in chunk])) for u in range(len(units))]
    images = [m.permute(0, 3, 1, 2).float() / 255.0 for m in maps]
    scales = [unit.scale for unit in units]
    # One adapter is called with its map and scale, several (a MultiAdapter) with a list of each.
    steer: dict[str, Any] = {"image": images, "adapter_conditioning_scale": scales}
    if len(units) == 1:
        steer = {"image": images[0], "adapter_conditioning_scale": scales[0]}
    if family == "sdxl":
        steer["adapter_conditioning_factor"] = units[0].end
    return steer


def _stack(
    family: Family, nets: list[torch.nn.Module], union: bool, skip_outside_window: bool, adapters: bool = False
) -> torch.nn.Module | None:
    """The module a pipeline calls as its `controlnet`: a ControlNet-Union itself; else the family's ControlNets,
    each skipped outside its window (`workers.engine.windows`), or diffusers' own stack (they take per-unit lists
    also for one net). None for FLUX.1 Control, which has no ControlNet."""
    if family == "flux-control":
        return None
    if union or (adapters and len(nets) == 1):
        return nets[0]
    if adapters:
        return MultiAdapter(nets)
    windowed, whole = _STACKS[family]
    return (windowed if skip_outside_window else whole)(nets)


_STACKS: dict[Family, tuple[type[torch.nn.Module], type[torch.nn.Module]]] = {
    "sd15": (WindowedControlNets, MultiControlNetModel),
    "sdxl": (WindowedControlNets, MultiControlNetModel),
    "flux": (WindowedFluxControlNets, FluxMultiControlNetModel),
    "sd3": (WindowedSD3ControlNets, SD3MultiControlNetModel),
}
"""Each family's ControlNet stack: skipping nets outside their windows, and diffusers' own."""


def _guided(family: Family, components: dict[str, Any], guidance_scale: float) -> bool:
    """Whether a call runs classifier-free guidance (the denoiser twice per step): not for FLUX.1 [dev], which
    is guidance-distilled (the scale is an input of its transformer), nor for a UNet distilled to take it as a
    time condition (LCM)."""
    if family in ("flux", "flux-control"):
        return False
    if family == "sd3":
        return guidance_scale > 1
    return guidance_scale > 1 and components["unet"].config.time_cond_proj_dim is None


def _mode(request: Request) -> str:
    """Which pipeline a call needs: from noise (`text`), from each item's start (`image`), or only within each
    item's mask (`inpaint`)."""
    if request.strength is None:
        return "text"
    return "inpaint" if request.items[0].mask is not None else "image"


def _inputs(pipe: DiffusionPipeline, chunk: Sequence[Item], strength: float | None) -> dict[str, Any]:
    """What an image-to-image call starts from: the items' starting latents and the strength; inpainting, the
    starting images, their masks and the strength. Nothing for a call from noise."""
    if strength is None:
        return {}
    if chunk[0].mask is not None:
        starts = {"image": [item.init for item in chunk], "mask_image": [item.mask for item in chunk]}
        return {**starts, "strength": strength}
    return {"image": _start_latents(pipe, chunk), "strength": strength}


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


def _embeddings(
    cache: ModelCache, family: Family, pipe: DiffusionPipeline, chunk: Sequence[Item], guided: bool
) -> dict[str, Any]:
    """The call's prompt embeddings, stacked from each item's pair, encoded once per process and pair: the same
    tensors the pipeline would have made, without the text encoders running for every task."""
    pairs = [cache.prompt_embeddings(pipe, family, item.prompt, item.negative_prompt, guided) for item in chunk]
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

    vae: torch.nn.Module

    @property
    def _execution_device(self) -> torch.device:
        return self.vae.device  # type: ignore[return-value]


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


class _ResidentFlux(_Resident, FluxControlNetPipeline):
    pass


class _ResidentFluxControl(_Resident, FluxControlPipeline):
    pass


class _ResidentSD3(_Resident, StableDiffusion3ControlNetPipeline):
    pass


class _ResidentSDAdapter(_Resident, StableDiffusionAdapterPipeline):
    pass


class _ResidentSDXLAdapter(_Resident, StableDiffusionXLAdapterPipeline):
    pass


_ADAPTER_PIPELINES: dict[Family, type[DiffusionPipeline]] = {"sd15": _ResidentSDAdapter, "sdxl": _ResidentSDXLAdapter}
_PIPELINES: dict[tuple[Family, bool, str], type[DiffusionPipeline]] = {
    ("sd15", False, "text"): _ResidentSD,
    ("sdxl", False, "text"): _ResidentSDXL,
    ("sd15", False, "image"): _ResidentSDImg2Img,
    ("sdxl", False, "image"): _ResidentSDXLImg2Img,
    ("sd15", False, "inpaint"): _ResidentSDInpaint,
    ("sdxl", False, "inpaint"): _ResidentSDXLInpaint,
    ("sdxl", True, "text"): _ResidentSDXLUnion,
    ("sdxl", True, "image"): _ResidentSDXLUnionImg2Img,
    ("sdxl", True, "inpaint"): _ResidentSDXLUnionInpaint,
    ("flux", False, "text"): _ResidentFlux,
    ("flux-control", False, "text"): _ResidentFluxControl,
    ("sd3", False, "text"): _ResidentSD3,
}
"""By (family, ControlNet-Union, `_mode`): what `_check` and `_check_fits` let through has one."""
_SD15 = (_ResidentSD, _ResidentSDImg2Img, _ResidentSDInpaint, _ResidentSDAdapter)
_SDXL = (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
)


def _pipeline(
    pipeline_class: type[DiffusionPipeline], components: dict[str, Any], stack: torch.nn.Module | None
) -> DiffusionPipeline:
    """The ControlNet pipeline over cached modules: about 0.5 ms, nothing loaded or copied."""
    extra: dict[str, Any] = {}
    if issubclass(pipeline_class, _SDXL):
        extra = {"add_watermarker": False}  # the output must not depend on whether a watermark package is installed
    elif issubclass(pipeline_class, _SD15):
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if stack is not None:
        extra["adapter" if isinstance(stack, T2IAdapter | MultiAdapter) else "controlnet"] = stack
    pipe = pipeline_class(**components, **extra)
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


@contextmanager
def _maps_by_mean(vae: Any) -> Iterator[None]:
    """Within a FLUX or SD 3 call, control maps enter as their VAE posterior's mean: those pipelines sample it,
    SD 3's from torch's global random stream, so an image would depend on its batch and its process's history
    (and, for an untrained VAE, on noise larger than the map). A map is a condition, not something to sample."""
    encode = vae.encode

    def by_mean(images: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        parameters = encode(images).latent_dist.parameters
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(parameters, deterministic=True))

    vae.encode = by_mean
    try:
        yield
    finally:
        del vae.encode  # the class's method again


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


def _check(family: Family, request: Request) -> None:
    """Refuse what the pipeline would silently reinterpret (resizing control maps) or fail on deep inside."""
    units, items, width, height = request.units, request.items, request.width, request.height
    scheduler, output_type, strength = request.scheduler, request.output_type, request.strength
    if family in TRANSFORMER_FAMILIES:
        _check_transformer(family, request)
    if request.adapters:
        _check_adapters(family, request)
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


def _check_transformer(family: Family, request: Request) -> None:
    """What FLUX.1 and SD 3 pipelines cannot do here, refused in one line."""
    if request.scheduler != "default":
        raise InvalidInput(f"{family} samples with its own flow-matching scheduler; set scheduler: default")
    if request.width % 16 or request.height % 16:
        raise InvalidInput(f"{family} renders sizes that are multiples of 16, not {request.width}×{request.height}")
    if request.strength is not None:
        raise InvalidInput(
            f"{family} renders from noise only here; finals, revisions and upscales render with SD 1.5 or SDXL"
        )
    if request.modes is not None:
        raise InvalidInput("a ControlNet-Union is made for SDXL")
    if request.lora is not None or request.board is not None:
        raise InvalidInput(f"a style pack's LoRA and mood board apply to SD 1.5 and SDXL UNets, not to {family}")


def _check_adapters(family: Family, request: Request) -> None:
    """What diffusers' T2I-Adapter pipelines take: SD 1.5 or SDXL, from noise, windows from 0 to one end."""
    if family not in _ADAPTER_PIPELINES:
        raise InvalidInput(f"T2I-Adapters are made for SD 1.5 and SDXL, not {family}")
    if request.strength is not None or request.modes is not None or request.board is not None:
        raise InvalidInput("T2I-Adapters render from noise only, without a ControlNet-Union or a mood board")
    ends = {unit.end for unit in request.units}
    if any(unit.start for unit in request.units) or len(ends) > 1 or (family == "sd15" and ends != {1.0}):
        raise InvalidInput("T2I-Adapters start at 0 and end together (SD 1.5's at the last step)")


def _check_fits(family: Family, request: Request, components: dict[str, Any], nets: Sequence[torch.nn.Module]) -> None:
    """Refuse a ControlNet or VAE made for another architecture (an SD 1.5 net under SDXL, a FLUX net under SD 3)
    with one line, rather than a shape error from deep inside the first step."""
    if family in TRANSFORMER_FAMILIES:
        _check_transformer_fits(family, request, components, nets)
        return
    base, units = request.base, request.units[: len(nets)]
    unet = components["unet"].config
    if request.adapters:
        for unit, net in zip(units, nets, strict=True):
            channels = list(getattr(net.config, "channels", []))
            if not isinstance(net, T2IAdapter) or channels[:2] != list(unet.block_out_channels)[:2]:
                raise InvalidInput(f"{unit.model!r} is not a T2I-Adapter made for {base!r}")
        return
    if components["vae"].config.latent_channels != unet.in_channels:
        raise InvalidInput(f"the VAE's {components['vae'].config.latent_channels} latent channels do not fit {base!r}")
    for unit, net in zip(units, nets, strict=True):
        if not isinstance(net, ControlNetModel | ControlNetUnionModel):
            raise InvalidInput(f"ControlNet {unit.model!r} is a {type(net).__name__}, not made for {family}")
        wants = (net.config.cross_attention_dim, net.config.addition_embed_type)
        if wants != (unet.cross_attention_dim, unet.addition_embed_type):
            raise InvalidInput(f"ControlNet {unit.model!r} is made for another kind of base model than {base!r}")


_TRANSFORMER_NETS: dict[Family, type[torch.nn.Module]] = {"flux": FluxControlNetModel, "sd3": SD3ControlNetModel}


def _check_transformer_fits(
    family: Family, request: Request, components: dict[str, Any], nets: Sequence[torch.nn.Module]
) -> None:
    """A FLUX or SD 3 stack: ControlNets of the base's family and width; FLUX.1 Control with its one map."""
    transformer = components["transformer"].config
    if family == "flux-control":
        unit = request.units[0]
        if len(request.units) != 1 or unit.model != request.base:
            raise InvalidInput(
                f"{request.base!r} is a FLUX.1 Control model: it takes one control map as input channels, so its "
                "profile has one unit that names no model"
            )
        if (unit.scale, unit.start, unit.end) != (1.0, 0.0, 1.0):
            raise InvalidInput(f"{request.base!r} is a FLUX.1 Control model: its unit takes no scale or window")
        return
    for unit, net in zip(request.units, nets, strict=True):
        if not isinstance(net, _TRANSFORMER_NETS[family]):
            raise InvalidInput(f"ControlNet {unit.model!r} is a {type(net).__name__}, not made for {family}")
        config: Any = net.config
        widths = (config.in_channels, config.joint_attention_dim)
        if widths != (transformer.in_channels, transformer.joint_attention_dim):
            raise InvalidInput(f"ControlNet {unit.model!r} is made for another {family} base than {request.base!r}")
        if getattr(config, "num_mode", None) is not None:
            raise InvalidInput(
                f"ControlNet {unit.model!r} is a FLUX union with control modes; archfarm runs mode-free FLUX "
                "ControlNets (Union-Pro-2.0, or one per kind)"
            )


def _fresh_scheduler(shared: SchedulerMixin, name: str) -> SchedulerMixin:
    """A scheduler of its own for this call: schedulers keep per-call state (timesteps, step index)."""
    cls = type(shared) if name == "default" else _SCHEDULERS[name]
    return cls.from_config(shared.config)


def _progress(on_step: Callable[[int, int], None] | None, steps: int, legacy: bool) -> dict[str, Any]:
    """The call's progress hook: `callback_on_step_end`, or the older `callback` diffusers' T2I-Adapter
    pipelines still take (step, timestep, latents), reported in the same asked-for steps."""
    if on_step is None:
        return {}
    if not legacy:
        return {"callback_on_step_end": _step_callback(on_step, steps)}
    done = itertools.count(1)

    def callback(_step: int, _timestep: Any, _latents: Any) -> None:
        on_step(min(next(done), steps), steps)  # PNDM runs one timestep more than asked

    return {"callback": callback, "callback_steps": 1}


def _step_callback(on_step: Callable[[int, int], None], steps: int) -> Callable[..., dict[str, Any]]:
    """Progress in the profile's steps: PNDM (SD 1.5's default) runs one timestep more than asked, and a user
    who asked for 8 steps should not read `step 9/9`."""

    def callback(pipe: DiffusionPipeline, index: int, _timestep: Any, _tensors: Any) -> dict:
        on_step(math.ceil((index + 1) * steps / pipe.num_timesteps), steps)
        return {}  # nothing to replace in the pipeline's state

    return callback
