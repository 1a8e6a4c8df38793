"""An offline "tiny" depth model: `DPTForDepthEstimation` at toy size, with seeded random weights.

It stands in for `Intel/dpt-large` in tests and the offline demo: the folder it writes loads back through
the same `from_pretrained` calls, so the depth path runs end to end with nothing downloaded. Its depth maps
mean nothing, but they vary with the input, and building twice gives byte-identical weights.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

_SEED = 1234
_SIZE = 64

# The default init draws from torch's process-wide RNG: two threads seeding it at once would interleave.
_build_lock = threading.Lock()


def build_dpt(folder: Path) -> None:
    """Save a tiny DPT depth model and its image processor into `folder`, laid out as `Intel/dpt-large` is."""
    # dpt-large's shape at toy width: a plain ViT (patch 16) feeding a four-stage neck, no auxiliary head.
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=_SIZE,
        patch_size=16,
        backbone_out_indices=(0, 1, 2, 3),
        neck_hidden_sizes=(8, 16, 32, 32),
        fusion_hidden_size=16,
        use_auxiliary_head=False,
    )
    with _build_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = DPTForDepthEstimation(config)
    # dpt-large's published preprocessing: a square input, pixels scaled to -1..1.
    processor = DPTImageProcessorPil(
        size={"height": _SIZE, "width": _SIZE}, keep_aspect_ratio=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
