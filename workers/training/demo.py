"""Train the offline demo's parts, so that tiny renders follow the plan: the tiny VAE's decoder, the tiny
UNet and the `tiny-plan` ControlNet, on synthetic plans in many drawing styles (`workers.training.drawings`).

With random weights everywhere, renders of six different plans came out within 1/255 of each other. Three
things stood in the way, each measured: a random VAE decoder cannot draw a plan at all (decoding the
encoder's own latents of a plan put edges near its walls no more often than chance); an epsilon-predicting
ControlNet beside a random UNet never learnt to use its map in a CPU-minute; and a v-predicting one beside
that random UNet learnt mostly the average building (8 of 12 held-out plans agreed best with their own
footprint). So, as a real ControlNet steers a base that already draws, the base is trained first: a decoder
trained as the decoding half of an autoencoder (its encoder stays random), latents at their own scale, a
v-prediction scheduler, and a UNet trained as a small diffusion model of plan targets. Then `tiny-plan` is
trained by `archfarm train` (`workers.training.trainer`) beside it. One training sheet in four is an empty
page, whose target is paper, so that a page without a plan renders as one.

`python -m workers.training.demo` makes all three again (`workers/engine/weights/`, about 17 minutes on 2
cores), each with a digest of what it was trained against; `tests/test_demo.py` measures the result on
drawing styles it never saw.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel
from PIL import Image
from safetensors.torch import load_file, save_file

from workers.training.drawings import HELD_OUT, TRAINED, Layout, blank, draw, fitted_target, layout

log = logging.getLogger(__name__)

SIZE = 128
"""The demo profiles' render size: plans, maps and targets are drawn at it."""
PROMPT = "a floor plan render"
PLANS = 512
TRAINING_SEED = 0
UNET_STEPS = 2000
CONTROLNET_STEPS = 3000


BLANK_EVERY = 4
"""One training sheet in this many is an empty page, so that a page without a plan renders as paper."""


Sheet = tuple[Image.Image, Layout]


def drawings(count: int, seed: int, styles: tuple[str, ...], blanks: bool = False) -> list[Sheet]:
    """`count` random plans drawn in `styles` by turns, each with its layout; with `blanks`, one sheet in
    `BLANK_EVERY` left empty."""
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        plan = layout(rng, SIZE)
        if blanks and index % BLANK_EVERY == BLANK_EVERY - 1:
            plan = blank(plan)
        pairs.append((draw(plan, styles[index % len(styles)], rng), plan))
    return pairs


def training_sheets() -> list[Sheet]:
    """What every trained part of the demo learns from: `PLANS` sheets in the trained styles, empty pages among
    them."""
    return drawings(PLANS, TRAINING_SEED, TRAINED, blanks=True)


def held_out(count: int, seed: int = 2024) -> list[Sheet]:
    """Plans the demo never trained on: other buildings, in the drawing styles kept out of training."""
    return drawings(count, seed, HELD_OUT)


def _as_tensor(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(picture, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


# --- the decoder ---------------------------------------------------------------------------------------------


def train_decoder(vae: AutoencoderKL, sheets: list[Sheet], steps: int = 500) -> tuple[dict[str, torch.Tensor], float]:
    """Train the decoder (and post_quant_conv) to decode the frozen encoder's latents of plan targets: L1,
    Adam 3e-3, batches of 8, latents jittered by a tenth of their spread so sampled latents decode too.
    Returns its weights and the latents' scale (1 / their standard deviation)."""
    from workers.engine.tiny import DECODER_PARTS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        targets = [fitted_target(plan, SIZE) for _, plan in sheets]
        data = torch.stack([_as_tensor(t) for t in targets])
        with torch.no_grad():
            latents = vae.encode(data).latent_dist.mode()
        spread = latents.std().item()
        trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        optimizer = torch.optim.Adam(trained, lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            index = torch.randint(0, len(targets), (8,), generator=generator)
            noisy = latents[index] + 0.1 * spread * torch.randn(latents[index].shape, generator=generator)
            loss = F.l1_loss(vae.decode(noisy).sample, data[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    state = {k: v.detach().contiguous().clone() for k, v in vae.state_dict().items() if k.startswith(DECODER_PARTS)}
    return state, round(1.0 / spread, 4)


# --- the UNet ------------------------------------------------------------------------------------------------


def train_unet(base: Path, sheets: list[Sheet], steps: int = UNET_STEPS) -> tuple[dict[str, torch.Tensor], str]:
    """Train the base's UNet as a small diffusion model of plan targets (empty pages included), at the
    timesteps an 8-step render visits, half the prompts empty: a base that draws buildings, for the ControlNet
    to steer to the plan's. v-prediction MSE on the frozen VAE's latents, AdamW 1e-3, batches of 16. The
    trained UNet replaces the base's; returns its weights and the digest of the VAE it was trained against."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from workers.engine import tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL.from_pretrained(base / "vae")
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
        scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
        targets = [fitted_target(plan, SIZE) for _, plan in sheets]
        with torch.no_grad():
            latents = vae.encode(torch.stack([_as_tensor(t) for t in targets])).latent_dist.mode()
            latents = latents * vae.config.scaling_factor
            tokens = tokenizer(
                [PROMPT, ""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
            ).input_ids
            texts = encoder(tokens)[0]
        timesteps = torch.tensor(_sampler_timesteps(base, 8))
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
        generator = torch.Generator().manual_seed(0)
        for step in range(steps):
            index = torch.randint(0, len(latents), (16,), generator=generator)
            clean = latents[index]
            noise = torch.randn(clean.shape, generator=generator)
            t = timesteps[torch.randint(0, len(timesteps), (16,), generator=generator)]
            text = texts[torch.randint(0, 2, (16,), generator=generator)]
            predicted = unet(scheduler.add_noise(clean, noise, t), t, encoder_hidden_states=text).sample
            loss = F.mse_loss(predicted, scheduler.get_velocity(clean, noise, t))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0:
                log.info("unet step %d loss %.4f", step, loss.item())
    unet.save_pretrained(base / "unet", safe_serialization=True)
    state = {k: v.detach().contiguous().clone() for k, v in unet.state_dict().items()}
    return state, tiny.state_digest(vae.state_dict())


# --- the ControlNet ------------------------------------------------------------------------------------------


def train_plan_controlnet(base: Path, folder: Path, sheets: list[Sheet], steps: int = CONTROLNET_STEPS) -> None:
    """`archfarm train` on synthetic plans in the trained styles: plan-depth and Canny maps in, coloured rooms
    out; the result saved to `folder`."""
    from shared.config import Settings
    from shared.training import TrainingSpec
    from workers.engine.tiny import plan_controlnet
    from workers.preprocessors.canny import AdaptiveCanny
    from workers.preprocessors.plan_depth import PlanDepth
    from workers.training.synthetic import write_metadata, write_pair
    from workers.training.trainer import train

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        rows = []
        preprocessors = (PlanDepth(), AdaptiveCanny())  # by turns: the demo profiles use both
        for index, (drawing, plan) in enumerate(sheets):
            control = preprocessors[index % 2](drawing, SIZE, SIZE)
            rows.append(write_pair(work / "data", f"{index:05d}", fitted_target(plan, SIZE), control, PROMPT))
        write_metadata(work / "data", rows)
        init = plan_controlnet(base)
        init.save_pretrained(work / "init", safe_serialization=True)
        spec = TrainingSpec.from_document(
            {
                "kind": "train",
                "name": "tiny-plan",
                "train": {
                    "base": str(base),
                    "init": str(work / "init"),
                    "dataset": str(work / "data"),
                    "resolution": SIZE,
                    "batch_size": 8,
                    "learning_rate": 1e-3,
                    "weight_decay": 0.0,
                    "max_steps": steps,
                    "checkpoint_every": steps,
                    "empty_prompts": 0.5,
                    "timesteps": _sampler_timesteps(base, 8),
                },
                "output": str(work / "run"),
            }
        )
        result = train(spec, Settings(device="cpu", models_dir=base.parent))
        log.info("trained tiny-plan: %d steps, final loss %.4f", result.steps, result.final_loss or 0.0)
        ControlNetModel.from_pretrained(work / "run" / "controlnet").save_pretrained(folder, safe_serialization=True)


def _sampler_timesteps(base: Path, steps: int) -> list[int]:
    """The timesteps the base's own scheduler visits in a render of `steps` steps."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_pretrained(base / "scheduler")
    scheduler.set_timesteps(steps)
    return sorted({int(t) for t in scheduler.timesteps})


def main() -> None:
    """Make the shipped files again: the base is built with a decoder trained now, its UNet is trained on plan
    targets, then `tiny-plan` is trained against that base; each is saved with the digest it was trained
    against."""
    from workers.engine import tiny
    from workers.engine.models import weights_sha256

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    parser.add_argument("--controlnet-steps", type=int, default=CONTROLNET_STEPS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    sheets = training_sheets()

    def trained_decoder(vae: AutoencoderKL) -> None:
        state, scale = train_decoder(vae, sheets)
        tiny.load_decoder(vae, state, scale)
        meta = {"encoder": tiny.state_digest(vae.encoder.state_dict()), "scaling_factor": str(scale)}
        save_file(state, str(tiny.DECODER), metadata=meta)

    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        tiny.build_sd15(base, decoder=trained_decoder, denoiser=lambda unet, vae: None)
        unet, vae = train_unet(base, sheets, args.unet_steps)
        save_file(unet, str(tiny.UNET), metadata={"vae": vae})
        train_plan_controlnet(base, Path(scratch) / "plan", sheets, args.controlnet_steps)
        trained = load_file(str(Path(scratch) / "plan" / "diffusion_pytorch_model.safetensors"))
        save_file(trained, str(tiny.PLAN_CONTROLNET), metadata={"base": weights_sha256(base)})
    print(f"wrote {tiny.DECODER}, {tiny.UNET} and {tiny.PLAN_CONTROLNET}")


if __name__ == "__main__":
    main()
