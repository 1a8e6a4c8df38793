"""Offline "tiny" models: real diffusers/transformers classes at toy size, with seeded random weights.

They exist so tests and the offline demo exercise the same code path as real models: each builder saves a
folder with `save_pretrained`, and everything downstream loads it back with `from_pretrained`. Nothing is
downloaded, and building twice gives byte-identical weights. The names without a leading underscore are
shared with `tiny_sdxl`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from shared.errors import ModelError
from shared.styles import CATALOG

SEED = 1234
# Measured (docs/tiny-models.md): std 0.02 barely moves a tiny render, 0.2 makes scale 0 vs 1 plainly different.
_ZERO_CONV_STD = 0.2
_TEXT_WIDTH = 32  # CLIP hidden size = UNet cross-attention width
_MAX_TOKENS = 77  # as SD 1.5: the pipeline pads every prompt to the tokenizer's model_max_length
HINT_CHANNELS = (8, 16, 32, 32)
"""The ControlNet hint encoder's widths: four levels, so a control map at image size meets the 1/8 latent."""
WEIGHTS = Path(__file__).resolve().parent / "weights"
DECODER = WEIGHTS / "tiny-vae-decoder.safetensors"
PLAN_CONTROLNET = WEIGHTS / "tiny-plan.safetensors"
UNET = WEIGHTS / "tiny-unet.safetensors"
"""The demo's trained parts (`workers.training.demo` makes them), each recording what it was trained against."""
DECODER_PARTS = ("decoder.", "post_quant_conv.")
_REBUILD = (
    "run `python -m workers.training.demo` to train the demo's weights for this build (about 17 minutes on 2 cores)"
)


def _word_merges() -> list[tuple[str, str]]:
    """Merges that spell each word of the built-in styles, so their prompts fit CLIP's 77 tokens as they do
    with a real vocabulary (byte by byte they would be cut); every byte stays reachable without them."""
    words = sorted({w for texts in CATALOG.values() for text in texts for w in re.findall(r"[a-z]+", text.lower())})
    merges: dict[tuple[str, str], None] = {}
    for word in (w for w in words if len(w) > 1):
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges[(merged, piece)] = None
            merged += piece
    return list(merges)


_MERGES = _word_merges()

# The default init draws from torch's process-wide RNG: two threads seeding it at once would interleave.
_build_lock = threading.Lock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Make module construction deterministic without disturbing the caller's RNG stream."""
    with _build_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _byte_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in id order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer from a generated vocabulary: any text tokenizes, nothing is fetched."""
    chars = _byte_unicode()
    merged = dict.fromkeys("".join(m) for m in _MERGES)
    tokens = [*chars, *(c + "</w>" for c in chars), *(t for t in merged if t not in chars)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=_MAX_TOKENS)


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A toy CLIP text encoder for `tokenizer`: its hidden size is what the UNet cross-attends to."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=64,
        projection_dim=_TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _unet() -> UNet2DConditionModel:
    # SD 1.5's layout at toy width: cross-attention down/up blocks, 4 latent channels, 8 "heads".
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def vae(scaling_factor: float = 0.18215, shift_factor: float | None = None, latent_channels: int = 4) -> AutoencoderKL:
    """A toy VAE with four levels as in every family, so the latent is 1/8 of the image and the ControlNet
    hint encoder matches; `scaling_factor` and `shift_factor` are the family's latent scale (SD 1.5's by
    default; FLUX and SD 3 shift too)."""
    levels = 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _scheduler() -> PNDMScheduler:
    # SD 1.5's published scheduler config.
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        # v-prediction: a toy ControlNet learns to use its map this way within CPU-minutes, where predicting the
        # noise does not (`workers.training.demo`).
        prediction_type="v_prediction",
    )


def build_sd15(
    folder: Path,
    decoder: Callable[[AutoencoderKL], None] | None = None,
    denoiser: Callable[[UNet2DConditionModel, AutoencoderKL], None] | None = None,
) -> None:
    """Save an SD 1.5-shaped pipeline folder; its model_index.json names no ControlNet, no safety checker.

    Its VAE decoder and its UNet are trained, so renders can show a plan at all and a ControlNet has a base
    that draws buildings to steer: the shipped ones, or what `decoder` and `denoiser` give them.
    """
    with seeded(SEED):
        unet = _unet()  # first, so build_canny can recreate it from the same seed
        tokenizer = clip_tokenizer()
        autoencoder = vae()
        pipe = StableDiffusionPipeline(
            vae=autoencoder,
            text_encoder=CLIPTextModel(text_config(tokenizer)),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    (decoder or _shipped_decoder)(autoencoder)
    (denoiser or _shipped_unet)(unet, autoencoder)
    pipe.save_pretrained(folder, safe_serialization=True)


def _shipped(path: Path, key: str, expected: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A shipped trained part's weights and metadata, once its metadata's `key` says it was trained against
    `expected` (a digest of `what`); another build refuses in one line that says how to train it again."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if meta.get(key) != expected:
        raise ModelError(f"{path.name} was trained for another {what} (another torch?): {_REBUILD}")
    return load_file(str(path)), meta


def _shipped_unet(unet: UNet2DConditionModel, autoencoder: AutoencoderKL) -> None:
    state, _ = _shipped(UNET, "vae", state_digest(autoencoder.state_dict()), "tiny VAE")
    unet.load_state_dict(state)


def _shipped_decoder(autoencoder: AutoencoderKL) -> None:
    state, meta = _shipped(DECODER, "encoder", state_digest(autoencoder.encoder.state_dict()), "tiny VAE encoder")
    load_decoder(autoencoder, state, float(meta["scaling_factor"]))


def load_decoder(autoencoder: AutoencoderKL, state: dict[str, torch.Tensor], scaling_factor: float) -> None:
    """Give the tiny VAE a trained decoder and the scale of its latents."""
    missing, unexpected = autoencoder.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(DECODER_PARTS) for k in missing):
        raise ModelError("the tiny VAE decoder's weights do not fit the tiny VAE")
    autoencoder.register_to_config(scaling_factor=scaling_factor)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """The sha256 of a state dict's names and values: what a shipped part was trained against."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\0" + state[name].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def plan_controlnet(base: Path) -> ControlNetModel:
    """The ControlNet `tiny-plan` starts from: `base`'s UNet copied, zero convolutions zero, as diffusers makes
    it, except the map's way in (the hint encoder's last convolution), which starts with small weights: the
    residual convolutions then learn from the map at the first step, where with both at zero the map only
    starts to count after thousands of steps (the "sudden convergence" of ControlNet training)."""
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    with seeded(0):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
        torch.manual_seed(0)
        with torch.no_grad():
            controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0.0, 0.02)
    return controlnet


def build_plan(folder: Path) -> None:
    """Save `tiny-plan`: the ControlNet for `build_sd15`'s base trained on Canny maps of synthetic plans of many
    drawing styles, so the demo profiles' renders follow the plan's footprint (`workers.training.demo`)."""
    from workers.engine.models import weights_sha256
    from workers.engine.presets import resolve

    base = Path(resolve("tiny-sd15", folder.parent))
    state, _ = _shipped(PLAN_CONTROLNET, "base", weights_sha256(base), "tiny base")
    controlnet = plan_controlnet(base)
    controlnet.load_state_dict(state)
    controlnet.save_pretrained(folder, safe_serialization=True)


def build_canny(folder: Path) -> None:
    """Save a ControlNet for `build_sd15`'s UNet, with live (non-zero) zero convolutions.

    It starts from the weights the base's UNet had before it was trained (the same seed recreates them): a
    random net whose map and scale visibly move a render, which is what the tests check.
    """
    with seeded(SEED):
        controlnet = ControlNetModel.from_unet(_unet(), conditioning_embedding_out_channels=HINT_CHANNELS)
        revive_zero_convs(controlnet)
    controlnet.save_pretrained(folder, safe_serialization=True)


def adapter(adapter_type: str, downscale_factor: int) -> T2IAdapter:
    """A T2I-Adapter whose two feature levels meet the tiny UNets' two down blocks (32 and 64 channels)."""
    with seeded(SEED):
        return T2IAdapter(
            in_channels=3,
            channels=[32, 64],
            num_res_blocks=2,
            downscale_factor=downscale_factor,
            adapter_type=adapter_type,
        )


def build_adapter(folder: Path) -> None:
    """Save a T2I-Adapter for `build_sd15`'s UNet: features at 1/8 (its cross-attention block) and 1/16."""
    adapter("full_adapter", 8).save_pretrained(folder, safe_serialization=True)


IP_ADAPTER_WEIGHTS = "ip-adapter.safetensors"
_IMAGE_WIDTH = 32


def build_ip_adapter(folder: Path) -> None:
    """Save an IP-Adapter for `build_sd15`'s UNet in the layout of h94/IP-Adapter's folders: a CLIP image encoder
    with projection (`image_encoder/`, with its preprocessor at the encoder's 32 px) and the adapter's weights
    (`ip-adapter.safetensors`: the image projection to four text-width tokens and, per cross-attention layer in
    the UNet's order, key and value projections of them), all seeded."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded(SEED):
        unet = _unet()
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=_IMAGE_WIDTH,
                projection_dim=_IMAGE_WIDTH,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=4,
            )
        )
        width = unet.config.cross_attention_dim
        weights = {
            "image_proj.proj.weight": torch.randn(4 * width, _IMAGE_WIDTH) * 0.2,
            "image_proj.proj.bias": torch.zeros(4 * width),
            "image_proj.norm.weight": torch.ones(width),
            "image_proj.norm.bias": torch.zeros(width),
        }
        layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
        for index, name in enumerate(layers):
            channels = _channels(unet, name)
            for projection in ("to_k_ip", "to_v_ip"):
                weights[f"ip_adapter.{2 * index + 1}.{projection}.weight"] = torch.randn(channels, width) * 0.2
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(folder / "image_encoder")
    save_file(weights, str(folder / IP_ADAPTER_WEIGHTS))


def _channels(unet: UNet2DConditionModel, processor: str) -> int:
    """The width of the UNet block an attention processor belongs to (as diffusers reads it)."""
    widths = list(unet.config.block_out_channels)
    if processor.startswith("mid_block"):
        return widths[-1]
    if processor.startswith("up_blocks"):
        return list(reversed(widths))[int(processor[len("up_blocks.")])]
    return widths[int(processor[len("down_blocks.")])]


def style_lora(base: Path, target: Path, seed: int, rank: int = 4) -> Path:
    """A UNet LoRA for the tiny SD 1.5 base in `base` (its attention projections, rank `rank`, seeded random
    weights: a stand-in for one trained on a studio's renders), saved as diffusers saves LoRAs; its file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    with seeded(seed):
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(str(target), unet_lora_layers=layers, safe_serialization=True)
    return target / "pytorch_lora_weights.safetensors"


def revive_zero_convs(controlnet: ControlNetModel) -> None:
    """Give the "zero convolutions" seeded random weights: diffusers zero-initialises them, which would make a
    fresh ControlNet's control image and scale no-ops. Call it inside `seeded`."""
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convs.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0.0, _ZERO_CONV_STD)
