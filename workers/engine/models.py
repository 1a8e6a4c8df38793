"""Models resident in a worker process: each loaded once with `from_pretrained`, then reused by every render.

Loading costs seconds and compiling minutes, against well under a second per image (docs/performance.md), so a worker
keeps what it has loaded (ControlNets within a memory budget, see `ModelCache`); routing work by model stack
keeps that set small. Nothing here
touches CUDA at import: a worker initialises it itself after it starts, since CUDA does not survive fork.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    DiffusionPipeline,
    FluxControlNetModel,
    FluxControlPipeline,
    FluxPipeline,
    ModelMixin,
    SD3ControlNetModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    T2IAdapter,
    TorchAoConfig,
)
from diffusers.quantizers import PipelineQuantizationConfig
from diffusers.utils import logging as _diffusers_logging
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn
from transformers.utils import logging as _transformers_logging

from shared import hub, published
from shared.config import Settings, get_settings
from shared.errors import ConfigError, InvalidInput, ModelError
from shared.registry import QUANTIZE_DEVICES, TRANSFORMER_FAMILIES, Family, is_url, known_family
from workers.engine.batching import padded
from workers.engine.compile import CompileOptions, compile_module, use_inductor_cache
from workers.engine.hints import encode_once
from workers.engine.loras import StyleLoras
from workers.engine.moodboards import MoodBoards
from workers.engine.presets import base_family, resolve

# A worker's log gets one line per task, not a progress bar per model load.
_diffusers_logging.disable_progress_bar()
_transformers_logging.disable_progress_bar()

# What a base model contributes to a ControlNet pipeline; a safety checker, feature extractor or image encoder
# is never loaded (renders of floor plans are not screened, and it would cost memory and a download).
BASE_COMPONENTS: dict[Family, tuple[str, ...]] = {
    "sd15": ("vae", "text_encoder", "tokenizer", "unet", "scheduler"),
    "sdxl": ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler"),
    "flux": ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "scheduler"),
    "flux-control": ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "scheduler"),
    "sd3": (
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "transformer",
        "scheduler",
    ),
}
_LOADERS: dict[Family, tuple[type[DiffusionPipeline], dict[str, Any]]] = {
    "sd15": (
        StableDiffusionPipeline,
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    ),
    "sdxl": (StableDiffusionXLPipeline, {"add_watermarker": False}),
    "flux": (FluxPipeline, {"image_encoder": None, "feature_extractor": None}),
    "flux-control": (FluxControlPipeline, {}),
    "sd3": (StableDiffusion3Pipeline, {"image_encoder": None, "feature_extractor": None}),
}
"""The pipeline class that loads each family's base, and what it must not load."""
CONTROLNET_CLASSES: dict[str, type[ModelMixin]] = {
    cls.__name__: cls
    for cls in (ControlNetModel, ControlNetUnionModel, FluxControlNetModel, SD3ControlNetModel, T2IAdapter)
}
"""The control networks archfarm runs (ControlNets and T2I-Adapters), by the `_class_name` of their config."""


PROMPT_CACHE = 256
"""Prompt pairs whose embeddings a worker keeps (each a few hundred KB on the device)."""


def pick_device(setting: str) -> torch.device:
    """The torch device for a `device` setting: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"device {setting!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {setting!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {setting!r} asked for, but CUDA is not available here")
    return device


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has: a GPU's total memory, or a CPU machine's physical RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on GPUs (SD 1.5 holds up in half precision, at twice the speed); float32 on CPUs."""
    return torch.float16 if device.type == "cuda" else torch.float32


def family_dtype(dtype: torch.dtype, family: Family) -> torch.dtype:
    """The dtype a family's stack runs in on a device whose UNet families run in `dtype`: FLUX and SD 3 in
    bfloat16 where the others run in half precision (their activations overflow float16), else `dtype`."""
    return torch.bfloat16 if dtype == torch.float16 and family in TRANSFORMER_FAMILIES else dtype


def module_bytes(module: nn.Module) -> int:
    """Memory held by a module's parameters and buffers; a quantised weight counts its int8 data and scales."""
    return sum(_tensor_bytes(tensor) for tensor in chain(module.parameters(), module.buffers()))


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass (torchao): the sum of the tensors it holds
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


class ModelCache:
    """One per worker process: base pipelines' components, VAEs and ControlNets, each loaded once.

    Bases and VAEs stay on the device for the process's life. ControlNets are kept in least-recently-used order
    within `controlnet_budget_bytes` of device memory (None: no limit; captured CUDA graphs count against it,
    see `graph_bytes`); past it, the least recently used net not in the current render moves to CPU memory
    (the offload tier, within `offload_budget_bytes`), from where using it again costs a copy (tens of ms on a
    GPU) instead of a load from disk (seconds). Only when the offload tier overflows is a net dropped. On a
    CPU device the moves cost nothing, but the tiers and counters behave the same.

    Counters, per cache key (a model's location, with " (int8)" for a quantised net), so callers and tests can
    see what a sequence of renders cost: `loads` (read from storage), `hits` (already on the device),
    `restores` (back from the offload tier), `evictions` (device → offload tier), `drops` (offload tier →
    gone); and `swaps`, the number of renders that used another stack than the render before.

    A model named by URL (`shared.published`) is fetched into `models_dir` once per version, through the
    storage `settings` (default: the process's), and loaded from there: the version a job pinned (`pin`).
    """

    def __init__(
        self,
        models_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        *,
        controlnet_budget_bytes: int | None = None,
        offload_budget_bytes: int | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.models_dir = models_dir
        use_inductor_cache(models_dir / ".inductor-cache")
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.controlnet_budget_bytes = controlnet_budget_bytes
        self.offload_budget_bytes = offload_budget_bytes
        self.loads: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.restores: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.swaps = 0
        self.graph_bytes = 0
        """Device memory held by captured CUDA graphs (their private pools), taken from the ControlNet budget."""
        self._last_stack: tuple[str, ...] | None = None
        self._bases: dict[str, dict[str, Any]] = {}
        self._vaes: dict[str, AutoencoderKL] = {}
        # Least recently used first in both tiers.
        self._controlnets: OrderedDict[str, ControlNetModel] = OrderedDict()
        self._offloaded: OrderedDict[str, ControlNetModel] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._compiled: dict[tuple[int, CompileOptions], nn.Module] = {}
        self._buckets: dict[tuple[object, ...], set[int]] = {}
        self._identities: dict[tuple[str, str], dict[str, str | None]] = {}
        self._pins: dict[str, str | None] = {}
        self._families: dict[str, Family] = {}
        self._prompts: OrderedDict[tuple[Any, ...], tuple[torch.Tensor | None, ...]] = OrderedDict()
        self.prompt_encodes = 0
        self.loras = StyleLoras()
        """Style packs' LoRAs, swapped into the resident UNets in place."""
        self.boards = MoodBoards(device, dtype)
        """Style packs' mood boards: the IP-Adapter each UNet holds and encoded board images."""

    def base(self, ref: str, text_encoders: str = "device", quantize: str | None = None) -> dict[str, Any]:
        """The base model's pipeline components (`BASE_COMPONENTS` of its family), on this cache's device and
        dtype; with `text_encoders="cpu"` its text encoders stay in CPU memory (`prompt_embeddings` runs them
        there), with `quantize="int8"` its denoiser (UNet or transformer) is int8 weight-only (torchao). Its
        family comes from its own config (`family`), so a renamed SDXL folder still loads as SDXL.

        Callers must not mutate the scheduler: it is shared; build a fresh one from its config per call.
        """
        location = self.location(ref)
        key = location + ("" if text_encoders == "device" else " (text encoders on cpu)")
        key += "" if quantize is None else f" ({quantize})"
        if key in self._bases:
            self.hits[key] += 1
            return self._bases[key]
        kind = self.family(ref)
        loader, unloaded = _LOADERS[kind]
        if quantize is not None:
            denoiser = "transformer" if kind in TRANSFORMER_FAMILIES else "unet"
            config = _quantization_config(quantize, self.device)
            unloaded = {**unloaded, "quantization_config": PipelineQuantizationConfig(quant_mapping={denoiser: config})}
        # The dtype goes to from_pretrained, not to `.to()`: loading in it keeps modules a model marks as
        # float32-only in float32, which a later cast would not (diffusers warns on every such cast).
        with _load_errors(ref, location, "model_index.json"):
            pipe = loader.from_pretrained(location, dtype=family_dtype(self.dtype, kind), **unloaded)
        components = {name: pipe.components[name] for name in BASE_COMPONENTS[kind]}
        for name, module in components.items():
            if isinstance(module, nn.Module) and not (text_encoders == "cpu" and name.startswith("text_encoder")):
                module.to(self.device)
        self._bases[key] = components
        self.loads[key] += 1
        return components

    def family(self, ref: str) -> Family:
        """The architecture of base `ref`, read from its own config (a name says nothing reliable), once."""
        if ref not in self._families:
            location = self.location(ref)
            if known_family(location) is None:  # its config is read, from the hub when it is not cached
                _check_hub(ref, location, "model_index.json")
            self._families[ref] = base_family(location)
        return self._families[ref]

    def vae(self, ref: str) -> AutoencoderKL:
        """A VAE of its own (a folder or hub id holding an `AutoencoderKL`), to use instead of a base's: e.g. an
        fp16-safe SDXL VAE, which spares SDXL's float32 decode in half precision."""
        location = self.location(ref)
        if location in self._vaes:
            self.hits[location] += 1
            return self._vaes[location]
        with _load_errors(ref, location, "config.json"):
            vae = AutoencoderKL.from_pretrained(location, dtype=self.dtype)
        vae.to(self.device)
        self._vaes[location] = vae
        self.loads[location] += 1
        return vae

    def controlnet(self, ref: str, quantize: str | None = None) -> ControlNetModel:
        """One ControlNet on this cache's device and dtype; see `controlnets`."""
        return self.controlnets([ref], quantize)[0]

    def controlnets(
        self, refs: Sequence[str], quantize: str | None = None, dtype: torch.dtype | None = None
    ) -> list[ControlNetModel]:
        """A render's ControlNets, on this cache's device, most recently used last, in `dtype` (the base's family's,
        `family_dtype`; default the cache's): any class of `CONTROLNET_CLASSES`.

        `quantize="int8"` gives int8 weight-only copies (torchao), cached apart from the unquantised ones.
        Making room for one never evicts another of `refs`: a stack larger than the budget stays on the device
        (over budget) until a later render needs the room.
        """
        config = None if quantize is None else _quantization_config(quantize, self.device)
        located = [(ref, self.location(ref)) for ref in refs]
        keys = [location if quantize is None else f"{location} ({quantize})" for _, location in located]
        return [
            self._controlnet(ref, location, key, config, frozenset(keys), dtype or self.dtype)
            for (ref, location), key in zip(located, keys, strict=True)
        ]

    def compiled(self, module: nn.Module, options: CompileOptions) -> nn.Module:
        """`module` (a UNet or ControlNet this cache holds) compiled with `options`, once per process."""
        key = (id(module), options)  # the entry holds the module, so its id is not reused while it exists
        if key not in self._compiled:
            self._compiled[key] = compile_module(module, options)
        return self._compiled[key]

    def bucket(self, shape: tuple[object, ...], images: int) -> int:
        """The batch a compiled call of `images` images pads to: the smallest bucket of `shape` (stack, size,
        sampler, options) this process has already compiled that holds them, else `padded(images)`. A job's
        tail of a few images then replays a compiled bucket instead of compiling another inside a task."""
        known = self._buckets.setdefault(shape, set())
        size = min((b for b in known if b >= images), default=padded(images))
        known.add(size)
        return size

    def prompt_embeddings(
        self, pipe: Any, family: Family, prompt: str, negative_prompt: str, guided: bool
    ) -> tuple[torch.Tensor | None, ...]:
        """The text encoders' output for one prompt pair (`_encode`) of a pipeline of `family`:
        computed once per process and pair (the `PROMPT_CACHE` most recent are kept), since a job renders the
        same few styles thousands of times."""
        encoders = tuple(id(getattr(pipe, name, None)) for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        key = (*encoders, prompt, negative_prompt, guided)
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        with torch.inference_mode():
            encoded = _encode(pipe, family, prompt, negative_prompt, guided, pipe.text_encoder.device)
        self.prompt_encodes += 1
        self._prompts[key] = tuple(None if t is None else t.to(self.device) for t in encoded)
        if len(self._prompts) > PROMPT_CACHE:
            self._prompts.popitem(last=False)
        return self._prompts[key]

    def note_stack(self, stack: tuple[str, ...]) -> None:
        """Count a swap whenever a render uses another model stack than the one before: the number that
        routing work by stack keeps low."""
        if self._last_stack is not None and stack != self._last_stack:
            self.swaps += 1
        self._last_stack = stack

    def resident(self) -> list[str]:
        """Cache keys of every model on the device (not the offload tier), for the worker's heartbeat row."""
        return [*self._bases, *self._vaes, *self._controlnets]

    def identity(self, ref: str) -> dict[str, str | None]:
        """What exactly `ref` names, for recording next to each result.

        A local folder (presets included) is identified by the sha256 of its weight files, a hub model by
        the commit of its locally cached snapshot (None when it is not cached yet), a published model also by
        its manifest's sha256 (`manifest_sha256`), the version a job pins.
        """
        location = self.location(ref)
        if (ref, location) not in self._identities:
            local = Path(location).is_dir()
            found = {
                "name": ref,
                "location": location,
                "sha256": weights_sha256(Path(location)) if local else None,
                "revision": None if local else _cached_revision(location),
            }
            if is_url(ref):
                found["manifest_sha256"] = published.digest_of(Path(location))
            self._identities[ref, location] = found
        return self._identities[ref, location]

    def pin(self, url: str, manifest_sha256: str | None) -> None:
        """The version of the model published at `url` that renders from now on use: the manifest sha256 its job
        was submitted with (None: whatever is published now, read at each use)."""
        self._pins[url] = manifest_sha256

    def location(self, ref: str) -> str:
        """Where `ref` loads from (`resolve`: a folder, presets built, or a hub id), a published model's URL
        fetched into the models folder (once per version)."""
        if not is_url(ref):
            return resolve(ref, self.models_dir)
        settings = self.settings or get_settings()
        return str(published.fetch(ref, self.models_dir, settings, self._pins.get(ref)))

    def _controlnet(
        self,
        ref: str,
        location: str,
        key: str,
        config: TorchAoConfig | None,
        keep: frozenset[str],
        dtype: torch.dtype,
    ) -> ControlNetModel:
        if key in self._controlnets:
            self._controlnets.move_to_end(key)
            self.hits[key] += 1
            return self._controlnets[key]
        if key in self._offloaded:
            controlnet = self._offloaded.pop(key)
            self._make_room(self._sizes[key], keep)
            self.restores[key] += 1
        else:
            # Loaded into CPU memory first: its size is known before room is made for it on the device.
            with _load_errors(ref, location, "config.json"):
                name = str(ControlNetModel.load_config(location).get("_class_name"))
                if name not in CONTROLNET_CLASSES:
                    raise ModelError(f"{ref!r} is a {name}, not a ControlNet ({', '.join(CONTROLNET_CLASSES)})")
                controlnet = CONTROLNET_CLASSES[name].from_pretrained(location, dtype=dtype, quantization_config=config)
                if isinstance(controlnet, ControlNetModel):  # a union's hint encoders run per mode in its one pass
                    controlnet = encode_once(controlnet)
            self._sizes[key] = module_bytes(controlnet)
            self._make_room(self._sizes[key], keep)
            self.loads[key] += 1
        controlnet.to(self.device)
        self._controlnets[key] = controlnet
        return controlnet

    def _make_room(self, size: int, keep: frozenset[str]) -> None:
        """Evict least recently used ControlNets, except those in `keep`, until `size` more bytes fit."""
        if self.controlnet_budget_bytes is None:
            return
        for key in [k for k in self._controlnets if k not in keep]:
            held = sum(self._sizes[k] for k in self._controlnets) + self.graph_bytes
            if held + size <= self.controlnet_budget_bytes:
                return
            self._evict(key)

    def _evict(self, key: str) -> None:
        """Move a ControlNet to the offload tier, then drop the tier's least recently used nets past its budget."""
        self._offloaded[key] = self._controlnets.pop(key).to("cpu")
        self.evictions[key] += 1
        budget = self.offload_budget_bytes
        while budget is not None and sum(self._sizes[k] for k in self._offloaded) > budget:
            dropped_key, dropped = self._offloaded.popitem(last=False)
            self._compiled = {k: m for k, m in self._compiled.items() if k[0] != id(dropped)}
            self.drops[dropped_key] += 1


def _encode(
    pipe: DiffusionPipeline, family: Family, prompt: str, negative_prompt: str, guided: bool, device: torch.device
) -> tuple[torch.Tensor | None, ...]:
    """`pipe.encode_prompt` for one image, as (prompt, negative, pooled, negative pooled) embeddings, those a
    family lacks None. FLUX.1 [dev] is guidance-distilled: no classifier-free guidance, so no negative prompt."""
    if family in ("flux", "flux-control"):
        embeds, pooled, _text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device)
        return embeds, None, pooled, None
    more = {"prompt_2": None, "prompt_3": None} if family == "sd3" else {}
    encoded = pipe.encode_prompt(
        prompt=prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=guided,
        negative_prompt=negative_prompt,
        **more,
    )
    return tuple(encoded)


def _quantization_config(quantize: str, device: torch.device) -> TorchAoConfig:
    """diffusers' torchao config for `quantize`, or InvalidInput naming what is missing: never a silent fallback
    to full precision."""
    if quantize not in QUANTIZE_DEVICES:
        raise InvalidInput(f"unknown quantisation {quantize!r}; one of {', '.join(QUANTIZE_DEVICES)}")
    if device.type not in QUANTIZE_DEVICES[quantize]:
        runs_on = " and ".join(QUANTIZE_DEVICES[quantize])
        raise ConfigError(f"{quantize} quantisation does not run on {device.type}, only on {runs_on}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    except (ImportError, ValueError) as error:  # not installed, or older than diffusers needs
        reason = str(error).splitlines()[0]
        needs = f"{quantize} quantisation needs the torchao package (pip install torchao)"
        raise ConfigError(f"{needs}: {reason}") from None


def weights_sha256(folder: Path) -> str:
    """sha256 over a model folder's safetensors files and their relative paths, in a fixed order.

    Configs are left out on purpose: they carry library versions, which change without the model changing.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cached_revision(repo_id: str) -> str | None:
    try:
        snapshot = snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    return Path(snapshot).name  # the hub cache names each snapshot folder by its commit


def _check_hub(ref: str, location: str, config: str) -> None:
    """A hub model neither in the local cache nor downloadable now fails at once: the hub library would
    retry first or, on a network that never answers, wait without end."""
    reason = hub.unloadable(location, config)
    if reason is not None:
        raise ModelError(f"cannot load model {ref!r}: {reason}")


@contextmanager
def _load_errors(ref: str, location: str, config: str) -> Iterator[None]:
    """Turn from_pretrained's many failure types into one ModelError naming the reference, after
    `_check_hub` (`config` is the file of the model that every load reads first)."""
    _check_hub(ref, location, config)
    try:
        yield
    # Missing folders and hub misses are OSError; a folder holding the wrong kind of model is ValueError.
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelError(f"cannot load model {ref!r} from {location}: {reason}") from error
