"""A style's LoRA file, checked and pinned at submit: one `.safetensors` file of UNet LoRA weights.

Only the header is read here (no torch): the tensors' names say whether the file holds LoRA weights for a
UNet. Text-encoder LoRAs are refused: a worker swaps a style's LoRA in place between tasks (diffusers'
hotswap), which diffusers does not support for text encoders, and the prompt-embedding cache assumes a
style never changes its text encoders.
"""

from __future__ import annotations

import json
import struct

from shared.errors import InvalidInput
from shared.images import content_hash
from shared.plans import store_input
from shared.spec import StyleLora
from shared.storage import Storages

MAX_LORA_BYTES = 2 * 1024**3
"""A UNet LoRA of rank 128 on SDXL is under 1 GB."""
_MAX_HEADER = 100 * 1024**2


def lora_keys(data: bytes, where: str) -> list[str]:
    """The tensor names of a safetensors file; InvalidInput when `data` is not one."""
    if len(data) < 8:
        raise InvalidInput(f"{where}: not a .safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise InvalidInput(f"{where}: not a .safetensors file (its header length is impossible)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInput(f"{where}: not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{where}: not a .safetensors file (its header is not a mapping)")
    return [key for key in header if key != "__metadata__"]


def check_lora(data: bytes, where: str) -> None:
    """A file a worker can swap into a UNet: LoRA weights (`lora_A`/`lora_B`, `lora_down`/`lora_up`), none for
    a text encoder."""
    keys = lora_keys(data, where)
    if not any("lora" in key for key in keys):
        raise InvalidInput(f"{where}: holds no LoRA weights (no tensor name contains 'lora')")
    if any(key.startswith(("text_encoder", "lora_te")) for key in keys):
        raise InvalidInput(
            f"{where}: holds text-encoder LoRA weights; a style's LoRA must be UNet-only (it is swapped in place "
            "between tasks, which diffusers does not support for text encoders)"
        )


def pin_lora(lora: StyleLora, storages: Storages, farm: bool, where: str) -> StyleLora:
    """`lora` read, checked and pinned by its content hash; for a farm, a local file copied into the farm's
    storage (content-addressed, under `inputs/`), so every worker reads the same bytes."""
    data = storages.read(lora.file, max_bytes=MAX_LORA_BYTES)
    check_lora(data, where)
    digest = content_hash(data)
    if lora.file_sha256 not in (None, digest):
        raise InvalidInput(f"{where}: {lora.file} changed since the style was saved")
    url = (
        store_input(data, ".safetensors", storages.open()) if farm and not lora.file.startswith("s3://") else lora.file
    )
    return lora.model_copy(update={"file": url, "file_sha256": digest})
