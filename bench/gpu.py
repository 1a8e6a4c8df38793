"""GPU benchmark: full-size SD 1.5 (+2 ControlNets) and SDXL (+1 ControlNet) built from their published
configs with random weights (no downloads), fp16, through archfarm's engine and through the plain pipeline.

    python bench/gpu.py [--quick] [--json]            # on a CUDA machine; prints each result as it comes
    python bench/gpu.py --quick --device cpu --tiny   # smoke run of the same code paths on a CPU

Measures images/s at 512² (SD 1.5, 30 steps, CFG) and 1024² (SDXL, 30 steps, CFG), eager vs compiled,
batch 1 vs 4, archfarm engine vs plain `pipe(...)`, and the achieved TFLOP/s from the FLOP counts in PERF.md:
84.7 TFLOP per SD 1.5 + 2 ControlNet image and 598 TFLOP per SDXL + 1 ControlNet image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TFLOP_PER_IMAGE = {"sd15": 84.7, "sdxl": 598.0}


def sd15_configs(tiny: bool) -> dict[str, Any]:
    """SD 1.5's published shapes (runwayml/stable-diffusion-v1-5), or a tiny stand-in for smoke runs."""
    if tiny:
        return {
            "unet": dict(
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                layers_per_block=1,
                attention_head_dim=4,
                sample_size=8,
            ),
            "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            "vae": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        }
    return {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            layers_per_block=2,
            attention_head_dim=8,
            sample_size=64,
        ),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    }


def sdxl_configs(tiny: bool) -> dict[str, Any]:
    """SDXL base 1.0's published shapes, or a tiny stand-in (dimensions kept consistent, see DIFFUSERS-NOTES)."""
    if tiny:
        return {
            "unet": dict(
                block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                layers_per_block=1,
                transformer_layers_per_block=(1, 1),
                cross_attention_dim=64,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=80,
                sample_size=8,
            ),
            "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            "text_2": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
            ),
            "vae": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        }
    return {
        "unet": dict(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            sample_size=128,
        ),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        "text_2": dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    }


def build(
    folder: Path, family: str, controlnets: int, tiny: bool, device: torch.device, dtype: torch.dtype
) -> tuple[Path, list[Path]]:
    """Save a random-weight base pipeline and its ControlNets with save_pretrained, as real ones would be.
    Modules are created on `device` (initialising 4.6 B SDXL parameters on a CPU takes minutes)."""

    torch.manual_seed(0)
    configs = sd15_configs(tiny) if family == "sd15" else sdxl_configs(tiny)
    with torch.device(device):
        return _build(folder, family, controlnets, configs, dtype)


def _build(folder: Path, family: str, controlnets: int, configs: dict[str, Any], dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from workers.engine.tiny import clip_tokenizer

    text_defaults = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **configs["unet"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        **configs["vae"],
    )
    tokenizer = clip_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(**{**text_defaults, **configs["text"]}))
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=PNDMScheduler(**betas, skip_prk_steps=True),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_defaults, **configs["text_2"]}))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text,
            text_encoder_2=text_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=EulerDiscreteScheduler(**betas),
        )
    base = folder / f"{family}-base"
    pipe.to(dtype).save_pretrained(base)
    nets = []
    for index in range(controlnets):
        net = ControlNetModel.from_unet(unet).to(dtype)
        path = folder / f"{family}-controlnet-{index}"
        net.save_pretrained(path)
        nets.append(path)
        del net
    del pipe, unet, vae, text
    return base, nets


def timed(
    label: str,
    images: int,
    family: str,
    fn: Callable[[], object],
    results: dict[str, Any],
    repeats: int,
    sync: Callable[[], None],
) -> None:
    fn()  # warm-up (and compilation, when compiled)
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    per_s = images * repeats / (time.perf_counter() - started)
    tflops = per_s * TFLOP_PER_IMAGE[family]
    results[label] = {"images_per_s": per_s, "tflops": tflops}
    print(f"{label:<40} {per_s:8.3f} images/s {tflops:8.1f} TFLOP/s", flush=True)


def bench_family(
    family: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, work: Path, results: dict[str, Any]
) -> None:
    """Plain pipeline call vs archfarm's engine, batch 1 vs 4, eager vs compiled, for one family."""
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from workers.engine.compile import CompileOptions
    from workers.engine.models import ModelCache
    from workers.engine.pipeline import ControlInput, render
    from workers.preprocessors.canny import AdaptiveCanny
    from workers.preprocessors.plan_depth import PlanDepth

    size = 64 if args.tiny else (512 if family == "sd15" else 1024)
    steps = 2 if args.tiny else 30
    started = time.perf_counter()
    base, nets = build(work, family, 2 if family == "sd15" else 1, args.tiny, device, dtype)
    print(f"{family}: built and saved random-weight models in {time.perf_counter() - started:.0f} s", flush=True)
    plan = Image.open(Path(__file__).resolve().parents[1] / "examples" / "floorplan.png").convert("RGB")
    maps = [AdaptiveCanny()(plan, size, size), PlanDepth()(plan, size, size)][: len(nets)]
    scales = [0.9, 0.6][: len(nets)]
    controls = [
        ControlInput(str(net), image, scale, 0.0, 1.0) for net, image, scale in zip(nets, maps, scales, strict=True)
    ]
    cache = ModelCache(work / "models", device, dtype)
    prompt = "modern interior design, clean lines, natural light"

    def engine(seeds: int, compile: CompileOptions | None = None) -> Callable[[], object]:
        return lambda: render(
            cache,
            base=str(base),
            controls=controls,
            prompt=prompt,
            negative_prompt="",
            seeds=list(range(seeds)),
            steps=steps,
            guidance_scale=7.5,
            width=size,
            height=size,
            compile=compile,
        )

    pipeline_class = StableDiffusionControlNetPipeline if family == "sd15" else StableDiffusionXLControlNetPipeline
    extra = (
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if family == "sd15"
        else {}
    )
    pipe = pipeline_class(
        **cache.base(str(base)),
        controlnet=MultiControlNetModel(cache.controlnets([c.model for c in controls])),
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)

    def plain(seeds: int) -> Callable[[], object]:
        return lambda: pipe(
            prompt,
            image=maps,
            controlnet_conditioning_scale=scales,
            num_inference_steps=steps,
            width=size,
            height=size,
            num_images_per_prompt=seeds,
            generator=[torch.Generator("cpu").manual_seed(s) for s in range(seeds)],
        )

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    repeats = 1 if args.quick else 3
    timed(f"{family} plain pipeline b1", 1, family, plain(1), results, repeats, sync)
    timed(f"{family} archfarm engine b1", 1, family, engine(1), results, repeats, sync)
    timed(f"{family} archfarm engine b4", 4, family, engine(4), results, repeats, sync)
    options = CompileOptions(mode="max-autotune-no-cudagraphs", backend="aot_eager" if args.tiny else "inductor")
    started = time.perf_counter()
    engine(1, options)()
    sync()
    results[f"{family} compile first call s"] = time.perf_counter() - started
    print(f"{family} first compiled call: {results[f'{family} compile first call s']:.0f} s", flush=True)
    timed(f"{family} archfarm engine compiled b1", 1, family, engine(1, options), results, repeats, sync)
    timed(f"{family} archfarm engine compiled b4", 4, family, engine(4, options), results, repeats, sync)
    shutil.rmtree(work / f"{family}-base", ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one timed repetition per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the code paths")
    parser.add_argument("--only", choices=["sd15", "sdxl"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu --tiny for a smoke run")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, dtype {dtype}, torch {torch.__version__}", flush=True)
    results: dict[str, Any] = {"device": name}
    work = Path(tempfile.mkdtemp(prefix="archfarm-gpu-bench-"))
    try:
        for family in [args.only] if args.only else ["sd15", "sdxl"]:
            bench_family(family, args, device, dtype, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
