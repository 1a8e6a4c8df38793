"""GPU benchmark: full-size SD 1.5 (+2 ControlNets) and SDXL (+1 ControlNet) built from their published
configs with random weights (no downloads), fp16, through archfarm's farm, its engine and the plain pipeline.

    python bench/gpu.py [--quick] [--json] [--only sd15]  # on a CUDA machine; prints each result as it comes
    python bench/gpu.py --quick --device cpu --tiny   # smoke run of the same code paths on a CPU

First the device's measured fp16 matmul peak. Then, for SD 1.5 + 2 ControlNets at 512² (30 steps, CFG):
the default archviz job (2 plans × 4 styles × 4 seeds, canny + plan-depth at [0.9, 0.6]) end to end through
the in-process farm (SQLite, local storage, the lifecycle a Celery worker runs, `batch: auto`), beside a
plain diffusers loop (one pipeline, called per plan, style and seed) over the same 32 images on the same
models. Then, per family, the engine alone at batch 1 and 4, eager and with CUDA graphs (`reduce-overhead`),
and the plain pipeline call; the eager engine with the UNet in channels_last and with fused QKV projections
(candidates, not defaults); and a worker's first compiled call with the fleet's compile cache cold and warm
(`archfarm warmup`).
Each figure with images/s and its share of the measured peak, from the FLOP counts per image: 84.7 TFLOP
(SD 1.5 + 2 ControlNets, 512²) and 598 TFLOP (SDXL + 1 ControlNet, 1024²).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
    """SDXL base 1.0's published shapes, or a tiny stand-in (dimensions kept consistent with each other)."""
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


def bench_device(name: str) -> tuple[torch.device, torch.dtype]:
    """The device a benchmark runs on and its dtype (fp16 on CUDA, fp32 on a CPU); exits if CUDA is missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu --tiny for a smoke run")
    return device, torch.float16 if device.type == "cuda" else torch.float32


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for `device`'s queued work, so that a timer stops when the work is done."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(device: torch.device, dtype: torch.dtype, tiny: bool) -> float:
    """The device's fp16 (fp32 on a CPU) matmul throughput in TFLOP/s: what "share of peak" is measured against."""
    n = 512 if tiny else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = synchronizer(device)
    for _ in range(3):
        a @ b
    sync()
    repeats = 5 if tiny else 50
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


JSON_LINES = False
"""`--json`: every measurement is printed as one JSON object on its own line the moment it is taken."""


def emit(label: str, value: Any, text: str) -> None:
    """One measurement (or a stage's failure), printed at once: a JSON line, or `text` for a person."""
    print(json.dumps({"measure": label, "value": value}) if JSON_LINES else text, flush=True)


def record(label: str, images: int, seconds: float, family: str, results: dict[str, Any]) -> None:
    per_s = images / seconds
    tflops = per_s * TFLOP_PER_IMAGE[family]
    share = tflops / results["peak_tflops"]
    results[label] = {"images_per_s": per_s, "tflops": tflops, "share_of_peak": share}
    emit(label, results[label], f"{label:<44} {per_s:8.3f} images/s {tflops:8.1f} TFLOP/s {share:6.1%} of peak")


def seconds(label: str, value: float, results: dict[str, Any]) -> None:
    results[label] = value
    emit(label, value, f"{label}: {value:.1f} s")


class Stages:
    """Runs the benchmark's stages in order, each isolated (a stage that fails is a line saying so, and the
    next one runs) and bounded (a stage that would start after the time budget is a line saying it was
    skipped), so a run always ends within its budget with everything it could measure printed."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn: Callable[[], object]) -> None:
        if self.left() <= 0:
            emit(f"{name} skipped", "time budget spent", f"{name}: skipped, the time budget is spent")
            return
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - a stage's failure is reported, the next stage still runs
            emit(
                f"{name} failed",
                f"{type(error).__name__}: {error}"[:500],
                f"{name}: FAILED {type(error).__name__}: {error}",
            )


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
    record(label, images * repeats, time.perf_counter() - started, family, results)


def bench_family(
    family: str,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    work: Path,
    results: dict[str, Any],
    stages: Stages,
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
    seconds(f"{family} models built and saved s", time.perf_counter() - started, results)
    plan = Image.open(Path(__file__).resolve().parents[1] / "examples" / "floorplan.png").convert("RGB")
    maps = [AdaptiveCanny()(plan, size, size), PlanDepth()(plan, size, size)][: len(nets)]
    scales = [0.9, 0.6][: len(nets)]
    controls = [
        ControlInput(str(net), image, scale, 0.0, 1.0) for net, image, scale in zip(nets, maps, scales, strict=True)
    ]
    cache = ModelCache(work / "models", device, dtype)
    prompt = "modern interior design, clean lines, natural light"

    def engine(seeds: int, compile: CompileOptions | None = None, scheduler: str = "default") -> Callable[[], object]:
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
            scheduler=scheduler,
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

    sync = synchronizer(device)
    repeats = 1 if args.quick else 3
    if family == "sd15":
        stages.run(
            "sd15 archviz job", lambda: archviz_job(args, device, work, base, nets, pipe, size, steps, results, sync)
        )
        if not args.tiny:  # tiny runs compile with aot_eager, which leaves nothing for a fleet to share
            stages.run(
                "sd15 fleet first call",
                lambda: fleet_first_call(args, device, work, base, nets, size, steps, results, stages),
            )
    stages.run(
        f"{family} plain b1", lambda: timed(f"{family} plain pipeline b1", 1, family, plain(1), results, repeats, sync)
    )
    stages.run(
        f"{family} engine b1",
        lambda: timed(f"{family} archfarm engine b1", 1, family, engine(1), results, repeats, sync),
    )
    stages.run(
        f"{family} engine b4",
        lambda: timed(f"{family} archfarm engine b4", 4, family, engine(4), results, repeats, sync),
    )
    for scheduler in ("unipc", "dpmpp_2m"):  # candidates for SD 1.5's default: PNDM syncs with the host each step
        label = f"{family} archfarm engine b4, {scheduler}"
        stages.run(
            label,
            lambda label=label, scheduler=scheduler: timed(
                label, 4, family, engine(4, None, scheduler), results, repeats, sync
            ),
        )
    stages.run(
        f"{family} layouts", lambda: layout_variants(family, cache, str(base), engine(4), results, repeats, sync)
    )
    if not (args.quick and family == "sd15"):  # the farm job above ran compiled already
        stages.run(f"{family} compiled", lambda: compiled_engine(family, args, engine, results, repeats, sync))
    shutil.rmtree(work / f"{family}-base", ignore_errors=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compiled_engine(
    family: str,
    args: argparse.Namespace,
    engine: Callable[..., Callable[[], object]],
    results: dict[str, Any],
    repeats: int,
    sync: Callable[[], None],
) -> None:
    """CUDA graphs: the host no longer sets the pace of a small call (docs/performance.md: 5.1× at b1, H200)."""
    from workers.engine.compile import CompileOptions

    options = CompileOptions(mode="reduce-overhead", backend="aot_eager" if args.tiny else "inductor")
    started = time.perf_counter()
    engine(1, options)()
    sync()
    seconds(f"{family} compile first call s", time.perf_counter() - started, results)
    timed(f"{family} archfarm engine compiled b1", 1, family, engine(1, options), results, repeats, sync)
    timed(f"{family} archfarm engine compiled b4", 4, family, engine(4, options), results, repeats, sync)


def layout_variants(  # the measurement's whole setting
    family: str,
    cache: Any,
    base: str,
    engine_b4: Callable[[], object],
    results: dict[str, Any],
    repeats: int,
    sync: Callable[[], None],
) -> None:
    """The eager engine at batch 4 with the UNet in channels_last and with fused QKV projections, each against
    the default layout measured above: candidates for the engine's defaults, adopted where they measure
    faster. The modules are put back as they were afterwards."""
    unet = cache.base(base)["unet"]
    unet.to(memory_format=torch.channels_last)
    timed(f"{family} archfarm engine b4, channels_last", 4, family, engine_b4, results, repeats, sync)
    unet.to(memory_format=torch.contiguous_format)
    unet.fuse_qkv_projections()
    timed(f"{family} archfarm engine b4, fused QKV", 4, family, engine_b4, results, repeats, sync)
    unet.unfuse_qkv_projections()


STYLES = ["modern", "scandinavian", "industrial", "japandi"]


def archviz_job(  # the measurement's whole setting
    args: argparse.Namespace,
    device: torch.device,
    work: Path,
    base: Path,
    nets: list[Path],
    pipe: Any,
    size: int,
    steps: int,
    results: dict[str, Any],
    sync: Callable[[], None],
) -> None:
    """The default archviz job through the in-process farm, and a plain diffusers loop over the same images."""
    from PIL import Image, ImageOps

    from producer.local import Embedded
    from shared.config import Settings
    from shared.spec import JobSpec
    from shared.styles import CATALOG
    from workers.preprocessors.canny import AdaptiveCanny
    from workers.preprocessors.plan_depth import PlanDepth

    example = Path(__file__).resolve().parents[1] / "examples" / "floorplan.png"
    mirrored = work / "floorplan-mirrored.png"
    ImageOps.mirror(Image.open(example)).save(mirrored)
    plans, seeds = [example, mirrored], 4
    images = len(plans) * len(STYLES) * seeds
    settings = Settings(
        database_url=f"sqlite:///{work / 'farm.db'}",
        storage_url=str(work / "renders"),
        models_dir=work / "models",
        device=str(device),
    )
    spec = JobSpec.model_validate(
        {
            "name": "archviz",
            "plans": [str(p) for p in plans],
            "styles": STYLES,
            "seeds": {"count": seeds},
            "profile": {
                "base": str(base),
                "controls": [
                    {"kind": "canny", "scale": 0.9, "model": str(nets[0])},
                    {"kind": "plan-depth", "scale": 0.6, "model": str(nets[1])},
                ],
                "steps": steps,
                "width": size,
                "height": size,
            },
        }
    )
    embedded = Embedded(settings)
    try:
        started = time.perf_counter()
        embedded.render(spec)  # warm: models loaded, compiled (`compile: auto`), memory per image measured
        sync()
        seconds("sd15 archviz job first run (loads, compiles) s", time.perf_counter() - started, results)
        started = time.perf_counter()
        report = embedded.render(spec)
        sync()
        took = time.perf_counter() - started
    finally:
        embedded.close()
    assert report.ok, report.errors
    record("sd15 archviz job through the farm", images, took, "sd15", results)

    def loop(first_only: bool = False) -> None:
        for plan_path in plans[:1] if first_only else plans:
            plan = Image.open(plan_path).convert("RGB")
            maps = [AdaptiveCanny()(plan, size, size), PlanDepth()(plan, size, size)]
            for style in STYLES:
                prompt, negative = CATALOG[style]
                for seed in range(seeds):
                    pipe(
                        prompt,
                        negative_prompt=negative,
                        image=maps,
                        controlnet_conditioning_scale=[0.9, 0.6],
                        num_inference_steps=steps,
                        width=size,
                        height=size,
                        generator=torch.Generator("cpu").manual_seed(seed),
                    )
                    if first_only:
                        return

    loop(first_only=args.quick)  # warm-up: with --quick one call, not the whole loop again
    sync()
    started = time.perf_counter()
    loop()
    sync()
    record("sd15 archviz job, plain diffusers loop", images, time.perf_counter() - started, "sd15", results)


def fleet_first_call(  # the measurement's whole setting
    args: argparse.Namespace,
    device: torch.device,
    work: Path,
    base: Path,
    nets: list[Path],
    size: int,
    steps: int,
    results: dict[str, Any],
    stages: Stages,
) -> None:
    """A worker's first compiled call, cold (nothing compiled anywhere) and warm (the fleet's compile cache holds
    it, the worker's own inductor cache is empty): `archfarm warmup` in two fresh processes, as two machines."""
    profile = work / "profile.json"
    controls = [{"kind": "canny", "model": str(nets[0])}, {"kind": "plan-depth", "model": str(nets[1])}]
    backend = "aot_eager" if args.tiny else "inductor"
    settings = dict(base=str(base), controls=controls, steps=steps, width=size, height=size, compile=True)
    profile.write_text(json.dumps({**settings, "compile_backend": backend}))
    for run in ("cold", "warm"):
        env = {
            **os.environ,
            "ARCHFARM_STORAGE_URL": str(work / "fleet"),
            "ARCHFARM_MODELS_DIR": str(work / "models"),
            "ARCHFARM_DEVICE": str(device),
            "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{run}"),
        }
        done = subprocess.run(
            [sys.executable, "-m", "producer.cli", "warmup", str(profile), "--batch", "1"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=max(1.0, stages.left()),
        )
        line = done.stdout.strip().splitlines()[-1]  # "cuda:0 batch 1: warm, loaded from the farm's cache, 9.1 s"
        seconds(f"sd15 first compiled call, fleet {run} s", float(line.rsplit(", ", 1)[1].removesuffix(" s")), results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one timed repetition per measurement")
    parser.add_argument("--json", action="store_true", help="one JSON object per line, each as it is measured")
    parser.add_argument("--budget", type=float, default=None, help="seconds (default: 540 with --quick, else none)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the code paths")
    parser.add_argument("--only", choices=["sd15", "sdxl"], default=None)
    args = parser.parse_args()
    global JSON_LINES
    JSON_LINES = args.json
    device, dtype = bench_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit("device", name, f"device: {name}, dtype {dtype}, torch {torch.__version__}")
    results: dict[str, Any] = {"device": name, "peak_tflops": matmul_peak(device, dtype, args.tiny)}
    emit("peak_tflops", results["peak_tflops"], f"measured matmul peak: {results['peak_tflops']:.1f} TFLOP/s")
    stages = Stages(args.budget if args.budget is not None else (540.0 if args.quick else float("inf")))
    work = Path(tempfile.mkdtemp(prefix="archfarm-gpu-bench-"))
    try:
        for family in [args.only] if args.only else ["sd15", "sdxl"]:
            stages.run(family, lambda family=family: bench_family(family, args, device, dtype, work, results, stages))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
