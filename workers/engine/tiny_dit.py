"""Offline "tiny" transformer families: FLUX.1 with a FLUX ControlNet, FLUX.1 Control, and SD 3 with an SD3
ControlNet, each at toy size as diffusers' own fast tests build them.

Same rules as `tiny` (whose helpers this reuses): real classes, seeded random weights, saved with
`save_pretrained` and loaded back with `from_pretrained`, byte-identical on every build. The T5 tokenizer is
a Unigram model over the built-in styles' words and single characters, so nothing comes from a hub.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from shared.styles import CATALOG
from workers.engine.tiny import SEED, clip_tokenizer, seeded, text_config, vae

_ZERO_STD = 0.2  # as `tiny`'s zero convolutions: a random ControlNet whose output layers are zero steers nothing
_LATENT = 4  # the tiny VAE's latent channels (real FLUX and SD 3 have 16)
_FLUX_LATENT_SCALE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1's published VAE config
_SD3_LATENT_SCALE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}  # SD 3's


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, SentencePiece-style word starts) whose pieces are the built-in styles' words and
    single characters: any text tokenizes, the styles' words as one piece each."""
    words = sorted({w for texts in CATALOG.values() for text in texts for w in re.findall(r"[a-z]+", text.lower())})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in words]
    pieces += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _t5(tokenizer: T5TokenizerFast, width: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _flux_transformer(control: bool) -> FluxTransformer2DModel:
    # FLUX.1 [dev]'s layout at toy width: double- and single-stream blocks, RoPE over (text, row, column) axes,
    # the guidance embedding of a guidance-distilled model. Packing 2×2 latent patches makes 4×4 channels; a
    # Control model takes the control map's packed latents beside the image's.
    packed = 4 * _LATENT
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=2 * packed if control else packed,
        out_channels=packed,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1 [dev]'s published scheduler config: the shift grows with the image's token count.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _flux_pipeline(control: bool) -> FluxPipeline:
    tokenizer = clip_tokenizer()
    t5_tok = t5_tokenizer()
    with seeded(SEED):
        transformer = _flux_transformer(control)  # first, so build_flux_controlnet can recreate it
        parts = {
            "transformer": transformer,
            "vae": vae(latent_channels=_LATENT, **_FLUX_LATENT_SCALE),
            "text_encoder": CLIPTextModel(text_config(tokenizer)),
            "tokenizer": tokenizer,
            "text_encoder_2": _t5(t5_tok, 32),
            "tokenizer_2": t5_tok,
            "scheduler": _flux_scheduler(),
        }
        if not control:
            return FluxPipeline(**parts)
        with torch.no_grad():  # the control map's input channels live, as a trained Control model's are
            transformer.x_embedder.weight[:, 4 * _LATENT :].normal_(0.0, _ZERO_STD)
        return FluxControlPipeline(**parts)


def build_flux(folder: Path) -> None:
    """Save a FLUX.1-shaped pipeline folder (FluxPipeline): CLIP and T5 text encoders, a FLUX transformer."""
    _flux_pipeline(control=False).save_pretrained(folder, safe_serialization=True)


def build_flux_control(folder: Path) -> None:
    """Save a FLUX.1 Control-shaped pipeline folder (FluxControlPipeline): its transformer takes the control
    map's latents as input channels beside the image's, as FLUX.1-Canny-dev / Depth-dev do."""
    _flux_pipeline(control=True).save_pretrained(folder, safe_serialization=True)


def build_flux_controlnet(folder: Path) -> None:
    """Save a FLUX ControlNet for `build_flux`'s transformer (its blocks copied, as trained ones start), mode-free
    like Union-Pro-2.0, its zero-initialised output layers live."""
    with seeded(SEED):
        transformer = _flux_transformer(control=False)
        controlnet = FluxControlNetModel(
            **{key: transformer.config[key] for key in _FLUX_SHARED}, num_layers=1, num_single_layers=1
        )
        controlnet.load_state_dict(transformer.state_dict(), strict=False)  # its blocks, as trained ones start
        _revive(controlnet.controlnet_blocks, controlnet.controlnet_single_blocks, [controlnet.controlnet_x_embedder])
    controlnet.save_pretrained(folder, safe_serialization=True)


_FLUX_SHARED = (
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)


def _sd3_transformer() -> SD3Transformer2DModel:
    # SD 3's MMDiT at toy width: joint text/image attention, 2×2 patches, two CLIP poolings (2×32) as the
    # pooled projection, T5's width (64) as the text width.
    return SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=_LATENT,
        out_channels=_LATENT,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=96,
    )


def build_sd3(folder: Path) -> None:
    """Save an SD 3-shaped pipeline folder (StableDiffusion3Pipeline): two CLIP encoders with projections, T5,
    an MMDiT transformer, a flow-matching scheduler."""
    tokenizer = clip_tokenizer()
    config = text_config(tokenizer)
    t5_tok = t5_tokenizer()
    with seeded(SEED):
        transformer = _sd3_transformer()  # first, so build_sd3_controlnet can recreate it
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            vae=vae(latent_channels=_LATENT, **_SD3_LATENT_SCALE),
            text_encoder=CLIPTextModelWithProjection(config),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(config),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=_t5(t5_tok, 64),
            tokenizer_3=t5_tok,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD 3's
        )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_sd3_controlnet(folder: Path) -> None:
    """Save an SD3 ControlNet for `build_sd3`'s transformer (its first block copied), output layers live."""
    with seeded(SEED):
        controlnet = SD3ControlNetModel.from_transformer(
            _sd3_transformer(), num_layers=1, num_extra_conditioning_channels=0
        )
        _revive(controlnet.controlnet_blocks, [controlnet.pos_embed_input.proj])
    controlnet.save_pretrained(folder, safe_serialization=True)


def _revive(*groups: nn.ModuleList | list[nn.Module]) -> None:
    """Seeded random weights for a ControlNet's zero-initialised layers (inside `seeded`)."""
    with torch.no_grad():
        for group in groups:
            for layer in group:
                layer.weight.normal_(0.0, _ZERO_STD)  # type: ignore[operator]
