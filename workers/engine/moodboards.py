"""A style pack's mood board, applied through an IP-Adapter loaded once into a resident UNet.

Each board image is encoded once per process (by content hash) by the adapter's CLIP image encoder; a board's
embedding is its images' mean. Once a UNet holds the adapter, every call gives it image embeddings: a style
without a board gets zeros at scale 0, which adds exactly nothing (its images are bitwise those of a UNet that
never held the adapter). `transfer: style` sets the scale only on the middle attention layer of the UNet's
first up block with attention (InstantStyle's style layer: SDXL's up_blocks.0.attentions.1), so a board's
colours and materials carry over and its layout does not; `all` sets it everywhere.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from safetensors import safe_open
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

MAX_EMBEDDINGS = 1024
"""Board images whose embeddings a worker keeps."""


@dataclass(frozen=True)
class Board:
    """A style's mood board as a call takes it: its images (decoded) with their content hashes."""

    images: tuple[PIL.Image.Image, ...]
    digests: tuple[str, ...]
    scale: float
    transfer: str


@dataclass(frozen=True)
class IPAdapter:
    """An IP-Adapter by its name (a preset or hub id) and where it loads from: a folder or hub id, its weights
    file and its image encoder's folder."""

    name: str
    location: str
    weights: str
    encoder: str


class MoodBoards:
    """Per worker process: the IP-Adapter each UNet holds, its image encoder, and encoded board images."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._held: dict[int, tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]] = {}
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encodes = 0

    def holds(self, unet: nn.Module) -> bool:
        return id(unet) in self._held

    def load(self, unet: nn.Module, adapter: IPAdapter) -> None:
        """Load `adapter` into `unet` (once): its projection and attention processors, and its image encoder."""
        if id(unet) in self._held:
            return
        state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        with safe_open(_file(adapter.location, adapter.weights), framework="pt", device="cpu") as f:
            for key in f.keys():
                part, _, name = key.partition(".")
                state[part][name] = f.get_tensor(key)
        unet._load_ip_adapter_weights([state])  # type: ignore[operator]
        added = [unet.encoder_hid_proj, *unet.attn_processors.values()]  # type: ignore[operator]
        for module in added:  # only what the adapter added: the UNet keeps the dtypes it was loaded with
            if isinstance(module, nn.Module):
                module.to(device=self.device, dtype=self.dtype)
        folder = _folder(adapter.location, adapter.encoder)
        encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=self.dtype).to(self.device)
        try:
            processor = CLIPImageProcessor.from_pretrained(folder)
        except OSError:  # h94's encoder folder holds no preprocessor: CLIP's defaults, as diffusers uses
            processor = CLIPImageProcessor()
        self._held[id(unet)] = (encoder, processor)

    def unload(self, unet: nn.Module) -> None:
        """Take the adapter out of `unet` (for a pipeline that takes no image embeddings: T2I-Adapters)."""
        if self._held.pop(id(unet), None) is None:
            return
        unet.encoder_hid_proj = None  # type: ignore[assignment]
        unet.config.encoder_hid_dim_type = None  # type: ignore[union-attr]
        unet.set_default_attn_processor()  # type: ignore[operator]

    def call_inputs(self, pipe: Any, unet: nn.Module, board: Board | None, items: int, guided: bool) -> dict[str, Any]:
        """The call's `ip_adapter_image_embeds` (one per item, the negative half zeros), with the adapter's scale
        set on `pipe`; nothing for a UNet that never held an adapter."""
        if id(unet) not in self._held:
            return {}
        if board is None:
            embedding = torch.zeros(1, self._width(unet), device=self.device, dtype=self.dtype)
            pipe.set_ip_adapter_scale(0.0)
        else:
            images = zip(board.images, board.digests, strict=True)
            embedding = torch.stack([self._embed(unet, image, key) for image, key in images]).mean(0)[None]
            pipe.set_ip_adapter_scale(board.scale if board.transfer == "all" else style_layer(unet, board.scale))
        positive = embedding[:, None].repeat(items, 1, 1)
        embeds = torch.cat([torch.zeros_like(positive), positive]) if guided else positive
        return {"ip_adapter_image_embeds": [embeds]}

    def _embed(self, unet: nn.Module, image: PIL.Image.Image, digest: str) -> torch.Tensor:
        if digest in self._embeddings:
            self._embeddings.move_to_end(digest)
            return self._embeddings[digest]
        encoder, processor = self._held[id(unet)]
        pixels = processor(image.convert("RGB"), return_tensors="pt").pixel_values
        with torch.inference_mode():
            found = encoder(pixels.to(device=self.device, dtype=self.dtype)).image_embeds[0]
        self.encodes += 1
        self._embeddings[digest] = found
        if len(self._embeddings) > MAX_EMBEDDINGS:
            self._embeddings.popitem(last=False)
        return found

    def _width(self, unet: nn.Module) -> int:
        return int(self._held[id(unet)][0].config.projection_dim)


def style_layer(unet: nn.Module, scale: float) -> dict[str, dict[str, list[float]]]:
    """`set_ip_adapter_scale`'s argument that sets `scale` on the middle attention layer of the first up block
    with attention, 0 everywhere else (InstantStyle)."""
    for index, block in enumerate(unet.up_blocks):  # type: ignore[arg-type]
        attentions = getattr(block, "attentions", None)
        if attentions:
            scales = [0.0] * len(attentions)
            scales[len(attentions) // 2] = scale
            return {"up": {f"block_{index}": scales}}
    raise ValueError("the UNet has no up block with attention")


def _folder(location: str, subfolder: str) -> str:
    if Path(location).is_dir():
        return str(Path(location) / subfolder)
    from huggingface_hub import snapshot_download

    return str(Path(snapshot_download(location, allow_patterns=[f"{subfolder}/*"])) / subfolder)


def _file(location: str, name: str) -> str:
    if Path(location).is_dir():
        return str(Path(location) / name)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(location, name)
