"""Which architecture a base model has, read from its own config: a model's name says nothing reliable.

Import-light on purpose (no torch, no diffusers): a look at one or two small JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.errors import ModelError
from shared.registry import Family


def family(location: str) -> Family:
    """ "flux" or "flux-control" for diffusers' FLUX.1 pipelines (Control when the transformer takes twice the
    channels it gives: the latents and the encoded control map), "sd3" for SD 3 / 3.5; "sdxl" when the pipeline
    is one of diffusers' SDXL classes or its UNet takes SDXL's added time embedding ("text_time"); "sd15"
    (SD 1.5-compatible) otherwise. `location` is a local folder or a hub id, as `resolve` gives it; a hub
    model's config is read from the local cache or fetched alone (a few KB)."""
    index = _config(location, "model_index.json")
    pipeline = "" if index is None else str(index.get("_class_name", ""))
    if pipeline.startswith("Flux"):
        transformer = _config(location, "transformer/config.json") or {}
        takes, gives = transformer.get("in_channels"), transformer.get("out_channels")
        return "flux-control" if gives is not None and takes == 2 * gives else "flux"
    if pipeline.startswith("StableDiffusion3"):
        return "sd3"
    if pipeline.startswith("StableDiffusionXL"):
        return "sdxl"
    unet = _config(location, "unet/config.json")
    if unet is not None and unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    if index is None and unet is None:
        raise ModelError(f"{location} has neither model_index.json nor unet/config.json: not a diffusers base model")
    return "sd15"


def _config(location: str, name: str) -> dict[str, Any] | None:
    """The JSON file `name` of a local folder or hub model; None when the model has no such file."""
    folder = Path(location)
    if folder.is_dir():
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(location, name)).read_text())
    except RemoteEntryNotFoundError:
        return None
    # Offline and not cached, no such repo, no network: OSError; a malformed id or file: ValueError.
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelError(f"cannot read {name} of {location}: {reason}") from error
