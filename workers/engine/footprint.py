"""What a model stack holds on a device, known before any of it loads: each model built from its config on the
meta device (no memory, no weights read), its parameters and buffers counted at the dtype it will run in.

A worker compares this with its device's memory before it claims a task (`workers.lifecycle`), so a stack
too large for its device goes to a worker that can hold it. Weights a model keeps in float32 whatever the run's
dtype (a few norms) make the figure a slight underestimate; the configs, not the weights, are read, from the
folder or the local Hugging Face cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import init_empty_weights

from shared.errors import ModelError
from shared.hub import cached_file

SKIPPED = frozenset(
    {"tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "safety_checker", "feature_extractor", "image_encoder"}
)
"""Pipeline components that hold no weights on the device, or that archfarm never loads."""
DENOISERS = frozenset({"unet", "transformer"})


def stack_bytes(
    base: str,
    controlnets: Sequence[str],
    vae: str | None,
    dtype: torch.dtype,
    text_encoders: str = "device",
    quantize_base: str | None = None,
) -> int:
    """Bytes the base (its weighted components), the ControlNets and a separate VAE hold on the device at
    `dtype`; each a location as `resolve` gives it (a folder or a hub id). Text encoders held in CPU memory
    (`text_encoders="cpu"`) are not counted; a denoiser quantised to int8 (`quantize_base`) counts its linear
    layers' weights at one byte each plus a scale per output (torchao's weight-only int8; a slight
    overestimate, as torchao leaves a few small layers as they are)."""
    size = torch.empty((), dtype=dtype).element_size()
    held = [
        name
        for name in _components(base)
        if not (vae and name == "vae") and not (text_encoders == "cpu" and name.startswith("text_encoder"))
    ]
    total = 0
    for name in held:
        elements, linear, outputs = _counts(base, name)
        if quantize_base and name in DENOISERS:
            total += (elements - linear) * size + linear + outputs * size
        else:
            total += elements * size
    others = sum(_counts(location, "")[0] for location in (*controlnets, *([vae] if vae else [])))
    return total + others * size


def _components(location: str) -> list[str]:
    index = json.loads(_read(location, "model_index.json"))
    return [name for name, value in index.items() if isinstance(value, list) and name not in SKIPPED and value[0]]


@cache
def _counts(location: str, subfolder: str) -> tuple[int, int, int]:
    """Parameters and buffers of the model in `location`/`subfolder`, built on the meta device from its config;
    and, of those, its linear layers' weights and their outputs (what an int8 weight-only quantisation
    stores as bytes and scales)."""
    config = json.loads(_read(location, f"{subfolder}/config.json" if subfolder else "config.json"))
    with init_empty_weights(include_buffers=True):
        if "_class_name" in config:  # a diffusers model
            model = getattr(diffusers, config["_class_name"]).from_config(config)
        else:  # a transformers model: its class is named in `architectures`
            built = transformers.AutoConfig.for_model(**config)
            model = getattr(transformers, config["architectures"][0])(built)
    elements = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return elements, sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)


def _read(location: str, name: str) -> bytes:
    """A config file of a local folder or of a hub model in the local cache (never downloaded for this)."""
    path = Path(location) / name if Path(location).is_dir() else cached_file(location, name)
    try:
        if path is None:
            raise FileNotFoundError("not in the local Hugging Face cache")
        return Path(path).read_bytes()
    except OSError as error:
        raise ModelError(f"{location}: cannot read {name} to size it ({error})") from None
