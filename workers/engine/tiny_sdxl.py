"""Offline "tiny" SDXL-shaped models: two text encoders, a UNet with SDXL's added time embeddings, a ControlNet.

Same rules as `tiny` (whose helpers this reuses): real classes at toy size, seeded random weights, saved with
`save_pretrained` and loaded back with `from_pretrained`, byte-identical on every build.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    ControlNetUnionModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from workers.engine.tiny import (
    HINT_CHANNELS,
    SEED,
    adapter,
    clip_tokenizer,
    revive_zero_convs,
    seeded,
    text_config,
    vae,
)

_TIME_EMBED_DIM = 8
_MODE_PROJECTION_STD = 0.5  # addition_time_embed_dim: each of SDXL's six size/crop numbers is embedded this wide


def _unet(text: CLIPTextConfig) -> UNet2DConditionModel:
    # SDXL's layout at toy width: a plain first level, cross-attention below it, linear projections in the
    # transformers, and the "text_time" added embedding (pooled text + original size, crop, target size).
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * text.hidden_size,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _TIME_EMBED_DIM + text.projection_dim,  # + pooled text
        norm_num_groups=32,
    )


def _scheduler() -> EulerDiscreteScheduler:
    # SDXL base's published scheduler config.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        use_karras_sigmas=False,
        steps_offset=1,
    )


def build_sdxl(folder: Path) -> None:
    """Save an SDXL-shaped pipeline folder (StableDiffusionXLPipeline); its model_index.json names no ControlNet."""
    tokenizer = clip_tokenizer()
    config = text_config(tokenizer)
    with seeded(SEED):
        unet = _unet(config)  # first, so build_controlnet can recreate it from the same seed
        pipe = StableDiffusionXLPipeline(
            vae=vae(scaling_factor=0.13025),  # SDXL's latent scale
            text_encoder=CLIPTextModel(config),
            text_encoder_2=CLIPTextModelWithProjection(config),
            tokenizer=tokenizer,
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=_scheduler(),
            add_watermarker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_controlnet(folder: Path) -> None:
    """Save a ControlNet for `build_sdxl`'s UNet (copied from it, as trained ones start), zero convs live."""
    config = text_config(clip_tokenizer())
    with seeded(SEED):
        controlnet = ControlNetModel.from_unet(_unet(config), conditioning_embedding_out_channels=HINT_CHANNELS)
        revive_zero_convs(controlnet)
    controlnet.save_pretrained(folder, safe_serialization=True)


def build_adapter(folder: Path) -> None:
    """Save a T2I-Adapter for `build_sdxl`'s UNet (SDXL's layout: both features at 1/16, after its plain first
    block's downsampling and inside its cross-attention block)."""
    adapter("full_adapter_xl", 16).save_pretrained(folder, safe_serialization=True)


def build_union(folder: Path) -> None:
    """Save a ControlNet-Union for `build_sdxl`'s UNet: one network, eight control modes (ProMax's: openpose,
    depth, soft edges, canny/lineart, normal, segment, tile, inpaint), its mode transformer at the tiny width
    (diffusers' default of 320 channels does not fit a 32-wide UNet), zero convs live."""
    config = text_config(clip_tokenizer())
    with seeded(SEED):
        unet = _unet(config)
        union = ControlNetUnionModel(
            **{key: unet.config[key] for key in _SHARED_WITH_UNET},
            conditioning_embedding_out_channels=HINT_CHANNELS,
            num_control_type=8,
            num_trans_channel=unet.config.block_out_channels[0],
            num_trans_head=2,
            num_proj_channel=unet.config.block_out_channels[0],
        )
        union.load_state_dict(unet.state_dict(), strict=False)  # the UNet's encoder, as trained ones start
        revive_zero_convs(union)
        with torch.no_grad():  # its zero-initialised projection of the modes' mixed features, live: modes steer
            union.spatial_ch_projs.weight.normal_(0.0, _MODE_PROJECTION_STD)
    union.save_pretrained(folder, safe_serialization=True)


_SHARED_WITH_UNET = (
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "use_linear_projection",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "norm_num_groups",
)
