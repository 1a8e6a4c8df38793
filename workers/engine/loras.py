"""A style pack's LoRA, swapped into a resident UNet in place between tasks (diffusers' LoRA hotswap).

The UNet is prepared for hotswapping once (`enable_lora_hotswap`: every LoRA padded to `TARGET_RANK`, its
scale a tensor), then each style's LoRA replaces the previous one's weights in the same layers: a compiled
UNet (and its CUDA graphs) sees the same graph, so a style change compiles nothing. A style without a LoRA,
on a UNet that has held one, gets the last LoRA with its up-projections zeroed: it adds exactly 0, so its
images are bitwise those of a UNet that never held a LoRA, with no recompilation either. A LoRA's weight is
baked into its up-projections (ΔW = w·B·A), so no per-style scale changes the graph. A LoRA on other layers
than the resident one cannot be swapped in place: the adapter is replaced (one recompilation, logged).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from shared.errors import InvalidInput

log = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"
"""A fetched LoRA's file in its folder of the model cache (`models/loras/<sha256>/`)."""
TARGET_RANK = 128
"""Ranks up to this swap in place; a style LoRA of a higher rank is refused."""
ADAPTER = "style"
KEPT_FILES = 8
"""LoRAs whose weights a worker keeps in CPU memory (a rank-16 SDXL LoRA is ~50 MB)."""
_UP = ("lora_B", "lora.up", "lora_up")


@dataclass(frozen=True)
class Lora:
    """A style's LoRA as a worker loads it: its file, its weight and its content hash (its identity)."""

    path: str
    weight: float
    sha256: str


class StyleLoras:
    """Per worker process: which LoRA each resident UNet holds, and the swaps that change it."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[str, float] | None] = {}
        self._last: dict[int, dict[str, torch.Tensor]] = {}
        self._files: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        """The most recent LoRAs' weights as read, by content hash: styles alternating between tasks swap from
        memory, not from disk."""
        self.swaps = 0
        """LoRA changes made in place (hotswaps): what a style change costs a compiled worker."""

    def apply(self, unet: nn.Module, lora: Lora | None) -> None:
        """Make `unet` render with `lora` (None: as if it held none)."""
        key = id(unet)
        want = None if lora is None else (lora.sha256, lora.weight)
        if self._held.get(key) == want:
            return
        if lora is None:
            if key in self._last:  # it has held one: keep the layers, add nothing
                self._swap(unet, {k: torch.zeros_like(v) if _up(k) else v for k, v in self._last[key].items()})
            self._held[key] = None
            return
        state = _scaled(self._read(lora), lora.weight)
        if key not in self._last:
            unet.enable_lora_hotswap(target_rank=TARGET_RANK)  # type: ignore[operator]
            unet.load_lora_adapter(state, adapter_name=ADAPTER, prefix="unet")  # type: ignore[operator]
        else:
            self._swap(unet, state)
        self._last[key], self._held[key] = state, want

    def _read(self, lora: Lora) -> dict[str, torch.Tensor]:
        if lora.sha256 in self._files:
            self._files.move_to_end(lora.sha256)
        else:
            self._files[lora.sha256] = lora_state_dict(lora)
            if len(self._files) > KEPT_FILES:
                self._files.popitem(last=False)
        return self._files[lora.sha256]

    def _swap(self, unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
        try:
            unet.load_lora_adapter(state, adapter_name=ADAPTER, prefix="unet", hotswap=True)  # type: ignore[operator]
        except RuntimeError as error:  # other layers than the resident LoRA's: no swap in place
            log.warning("a style LoRA targets other layers than the last one: replacing the adapter (%s)", error)
            unet.delete_adapters([ADAPTER])  # type: ignore[operator]
            unet.load_lora_adapter(state, adapter_name=ADAPTER, prefix="unet")  # type: ignore[operator]
        self.swaps += 1


def lora_state_dict(lora: Lora) -> dict[str, torch.Tensor]:
    """The file's UNet LoRA weights in diffusers' layout (kohya and other layouts converted by diffusers)."""
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(lora.path)
    except (OSError, ValueError, KeyError) as error:
        raise InvalidInput(f"LoRA {lora.sha256[:12]}…: not a LoRA diffusers can load ({error})") from None
    if alphas:  # kohya-style files scale each layer by its own alpha: not swappable with one tensor scale here
        raise InvalidInput(f"LoRA {lora.sha256[:12]}…: network alphas are not supported; save it in diffusers' format")
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k or "lora.down" in k}
    if ranks and max(ranks) > TARGET_RANK:
        raise InvalidInput(f"LoRA {lora.sha256[:12]}…: rank {max(ranks)} is over {TARGET_RANK}")
    return state


def _scaled(state: dict[str, Any], weight: float) -> dict[str, torch.Tensor]:
    return {k: v * weight if _up(k) else v for k, v in state.items()}


def _up(key: str) -> bool:
    return any(part in key for part in _UP)
