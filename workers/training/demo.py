"""The offline demo's trained parts, so that tiny renders follow the plan: the tiny VAE's decoder and the
`tiny-plan` ControlNet, trained on synthetic floor plans.

With random weights everywhere, renders of six different plans came out within 1/255 of each other. Two
things stood in the way, both measured: a random VAE decoder cannot draw a plan at all (decoding the
encoder's own latents of a plan put edges near its walls no more often than chance), and an epsilon-
predicting ControlNet beside a random UNet never learnt to use its map in a CPU-minute. So the tiny base
gets a decoder trained as the decoding half of an autoencoder (its encoder stays random), a v-prediction
scheduler and its latents' own scale, and `tiny-plan` is trained by `archfarm train` (`workers.training.
trainer`) on Canny maps of plans at the timesteps an 8-step render visits.

Both are shipped as small safetensors files (`workers/engine/weights/`), made by `python -m workers.training.
demo`; each records a digest of what it was trained against, and a build that finds another (a torch whose
seeded init differs) trains its own instead, which takes a few CPU-minutes.
"""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file, safe_open, save_file

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent.parent / "engine" / "weights"
DECODER = WEIGHTS / "tiny-vae-decoder.safetensors"
PLAN_CONTROLNET = WEIGHTS / "tiny-plan.safetensors"
SIZE = 128
"""The demo profiles' render size: plans, maps and targets are drawn at it."""
PROMPT = "a floor plan render"
PLANS = 256
_PAPER, _WALL = (235, 235, 230), (40, 40, 40)
_DECODER_PARTS = ("decoder.", "post_quant_conv.")
_ROOMS = [(170, 120, 70), (200, 180, 140), (120, 140, 160), (150, 170, 120)]


def plan_pair(rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """A four-room plan (black walls on white, a footprint of any proportions and place) and its target: the
    same walls dark on paper and each room its colour by its corner of the footprint, so the target follows
    from the plan alone."""
    plan, target = Image.new("RGB", (SIZE, SIZE), (255, 255, 255)), Image.new("RGB", (SIZE, SIZE), _PAPER)
    width, height = rng.randint(56, SIZE - 8), rng.randint(56, SIZE - 8)
    x0, y0 = rng.randint(4, SIZE - 4 - width), rng.randint(4, SIZE - 4 - height)
    x1, y1 = x0 + width, y0 + height
    xs, ys = rng.randint(x0 + 18, x1 - 18), rng.randint(y0 + 18, y1 - 18)
    rooms = [(x0, y0, xs, ys), (xs, y0, x1, ys), (x0, ys, xs, y1), (xs, ys, x1, y1)]
    for room, colour in zip(rooms, _ROOMS, strict=True):
        ImageDraw.Draw(target).rectangle(room, fill=colour)
    for picture, ink in ((plan, (0, 0, 0)), (target, _WALL)):
        draw = ImageDraw.Draw(picture)
        draw.rectangle((x0, y0, x1, y1), outline=ink, width=3)
        draw.line((xs, y0, xs, y1), fill=ink, width=2)
        draw.line((x0, ys, x1, ys), fill=ink, width=2)
    return plan, target


def _targets(count: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    pictures = [plan_pair(rng)[1] for _ in range(count)]
    return torch.stack([torch.from_numpy(np.array(p, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for p in pictures])


# --- the decoder ---------------------------------------------------------------------------------------------


def fit_decoder(vae: AutoencoderKL) -> None:
    """Give the tiny VAE its trained decoder and latent scale: shipped when the encoder matches, else trained."""
    digest = _digest(vae.encoder.state_dict())
    if DECODER.is_file():
        with safe_open(str(DECODER), "pt") as f:
            meta = f.metadata()
        if meta.get("encoder") == digest:
            _load_decoder(vae, load_file(str(DECODER)), float(meta["scaling_factor"]))
            return
    log.warning("the shipped tiny VAE decoder was made for another encoder: training one (about a minute)")
    _load_decoder(vae, *train_decoder(vae))


def train_decoder(vae: AutoencoderKL, steps: int = 400) -> tuple[dict[str, torch.Tensor], float]:
    """Train the decoder (and post_quant_conv) to decode the frozen encoder's latents of plan targets: L1,
    Adam 3e-3, batches of 8, latents jittered by a tenth of their spread so sampled latents decode too.
    Returns its weights and the latents' scale (1 / their standard deviation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        data = _targets(PLANS, seed=0)
        with torch.no_grad():
            latents = vae.encode(data).latent_dist.mode()
        spread = latents.std().item()
        trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        optimizer = torch.optim.Adam(trained, lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            index = torch.randint(0, PLANS, (8,), generator=generator)
            noisy = latents[index] + 0.1 * spread * torch.randn(latents[index].shape, generator=generator)
            loss = F.l1_loss(vae.decode(noisy).sample, data[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    state = {k: v.detach().clone() for k, v in vae.state_dict().items() if k.startswith(_DECODER_PARTS)}
    return state, round(1.0 / spread, 4)


def _load_decoder(vae: AutoencoderKL, state: dict[str, torch.Tensor], scaling_factor: float) -> None:
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(_DECODER_PARTS) for k in missing):
        raise RuntimeError("the tiny VAE decoder's weights do not fit the tiny VAE")
    vae.register_to_config(scaling_factor=scaling_factor)


# --- the ControlNet ------------------------------------------------------------------------------------------


def build_plan_controlnet(folder: Path, base: Path, hint_channels: tuple[int, ...]) -> None:
    """Save `tiny-plan` for the tiny base at `base`: the shipped weights when they were trained against it,
    else a ControlNet trained now with `archfarm train`."""
    from workers.engine.models import weights_sha256

    digest = weights_sha256(base)
    controlnet = _fresh_controlnet(base, hint_channels)
    if PLAN_CONTROLNET.is_file():
        with safe_open(str(PLAN_CONTROLNET), "pt") as f:
            shipped = f.metadata().get("base") == digest
        if shipped:
            controlnet.load_state_dict(load_file(str(PLAN_CONTROLNET)))
            controlnet.save_pretrained(folder, safe_serialization=True)
            return
    log.warning("the shipped tiny-plan ControlNet was made for another tiny base: training one (a few minutes)")
    train_plan_controlnet(base, controlnet, folder)


def train_plan_controlnet(base: Path, controlnet: ControlNetModel, folder: Path, steps: int = 700) -> None:
    """`archfarm train` on synthetic plans: Canny maps in, coloured rooms out; the result saved to `folder`."""
    from shared.config import Settings
    from shared.training import TrainingSpec
    from workers.preprocessors.canny import AdaptiveCanny
    from workers.training.synthetic import write_metadata, write_pair
    from workers.training.trainer import train

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        rng = random.Random(0)
        rows = []
        for index in range(PLANS):
            plan, target = plan_pair(rng)
            rows.append(write_pair(work / "data", f"{index:05d}", target, AdaptiveCanny()(plan, SIZE, SIZE), PROMPT))
        write_metadata(work / "data", rows)
        controlnet.save_pretrained(work / "init", safe_serialization=True)
        spec = TrainingSpec.from_document(
            {
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
        trained = ControlNetModel.from_pretrained(work / "run" / "controlnet")
        trained.save_pretrained(folder, safe_serialization=True)


def _fresh_controlnet(base: Path, hint_channels: tuple[int, ...]) -> ControlNetModel:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)


def _sampler_timesteps(base: Path, steps: int) -> list[int]:
    """The timesteps the base's own scheduler visits in a render of `steps` steps."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_pretrained(base / "scheduler")
    scheduler.set_timesteps(steps)
    return sorted({int(t) for t in scheduler.timesteps})


def _digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\0" + state[name].detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    """Make the shipped files again: a base built without them trains its decoder, then `tiny-plan` is trained
    against that base; each is saved with the digest it was trained against."""
    from workers.engine.models import weights_sha256
    from workers.engine.presets import resolve

    logging.basicConfig(level=logging.INFO)
    DECODER.unlink(missing_ok=True)
    PLAN_CONTROLNET.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(resolve("tiny-sd15", Path(scratch)))
        vae = AutoencoderKL.from_pretrained(base / "vae")
        state = {k: v.contiguous() for k, v in vae.state_dict().items() if k.startswith(_DECODER_PARTS)}
        meta = {"encoder": _digest(vae.encoder.state_dict()), "scaling_factor": str(vae.config.scaling_factor)}
        save_file(state, str(DECODER), metadata=meta)
        plan = Path(resolve("tiny-plan", Path(scratch)))
        trained = load_file(str(plan / "diffusion_pytorch_model.safetensors"))
        save_file(trained, str(PLAN_CONTROLNET), metadata={"base": weights_sha256(base)})
    print(f"wrote {DECODER} and {PLAN_CONTROLNET}")


if __name__ == "__main__":
    main()
