"""What archfarm costs on top of a plain diffusers loop, in images/s ratios.

    python bench/overhead.py [--quick] [--json] [--reps N]

The baseline is the usual archviz script written plainly: one StableDiffusionControlNetPipeline with
Canny + depth ControlNets at [0.9, 0.6], control maps computed once, then one pipeline call per style and
seed, each image saved as PNG. The same work (models, size, steps, plan, styles, seeds) then runs through
(a) that loop, (b) archfarm in-process (`Embedded`, as `archfarm render`), (c) archfarm distributed with
one worker, (d) with two workers (Redis + PostgreSQL on 127.0.0.1; override with ARCHFARM_BENCH_REDIS_URL /
ARCHFARM_BENCH_POSTGRES_URL). Models are loaded before timing in every variant; each variant is repeated
and reported as median images/s with its spread; ratios are to the plain loop's median.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_workers, farm_environment, scratch_database  # noqa: E402
from producer.local import Embedded  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.spec import JobSpec  # noqa: E402
from shared.styles import CATALOG  # noqa: E402
from workers.engine.presets import resolve  # noqa: E402
from workers.preprocessors.canny import AdaptiveCanny  # noqa: E402
from workers.preprocessors.depth import depth_estimator  # noqa: E402

PLAN = ROOT / "examples" / "floorplan.png"
STYLES = ["modern", "industrial"]


def profile(size: int, steps: int, depth_net: str) -> dict[str, Any]:
    return {
        "base": "tiny-sd15",
        "width": size,
        "height": size,
        "steps": steps,
        "controls": [
            {"kind": "canny", "model": "tiny-canny", "scale": 0.9},
            {"kind": "depth", "model": depth_net, "depth_model": "tiny-dpt", "scale": 0.6, "resolution": 64},
        ],
    }


def job(seeds: int, size: int, steps: int, depth_net: str, output: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "overhead",
            "plans": [str(PLAN)],
            "styles": STYLES,
            "seeds": {"count": seeds},
            "profile": profile(size, steps, depth_net),
            "output": str(output),
        }
    )


def plain_loop(models_dir: Path, depth_net: str, size: int, steps: int, seeds: int) -> Callable[[Path], None]:
    """A plain archviz script's pipeline, with tiny models: loaded once, then called per style and seed."""
    from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline

    nets = [
        ControlNetModel.from_pretrained(resolve("tiny-canny", models_dir)),
        ControlNetModel.from_pretrained(depth_net),
    ]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        resolve("tiny-sd15", models_dir),
        controlnet=MultiControlNetModel(nets),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    plan = Image.open(PLAN).convert("RGB")
    edges = AdaptiveCanny()(plan, size, size)
    depth = depth_estimator(resolve("tiny-dpt", models_dir), torch.device("cpu"), 64)(plan, size, size)

    def run(out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for style in STYLES:
            prompt, negative = CATALOG[style]
            for seed in range(seeds):
                image = pipe(
                    prompt,
                    negative_prompt=negative,
                    image=[edges, depth],
                    controlnet_conditioning_scale=[0.9, 0.6],
                    num_inference_steps=steps,
                    width=size,
                    height=size,
                    generator=torch.Generator("cpu").manual_seed(seed),
                ).images[0]
                image.save(out / f"{style}-{seed}.png")

    return run


def repeat(label: str, images: int, reps: int, fn: Callable[[int], None]) -> list[float]:
    fn(-1)  # warm-up: models loaded, caches filled
    rates = []
    for rep in range(reps):
        started = time.perf_counter()
        fn(rep)
        rates.append(images / (time.perf_counter() - started))
    print(f"{label:<16} median {median(rates):7.3f} images/s  (min {min(rates):.3f}, max {max(rates):.3f})", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer seeds and repetitions (under 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    seeds = 2 if args.quick else 4
    reps = args.reps or (2 if args.quick else 5)
    images = len(STYLES) * seeds
    work = Path(tempfile.mkdtemp(prefix="archfarm-overhead-"))
    models_dir = Path(os.environ.get("ARCHFARM_MODELS_DIR") or work / "models")
    depth_net = str(work / "depth-controlnet")  # a second ControlNet folder, standing in for sd-controlnet-depth
    shutil.copytree(resolve("tiny-canny", models_dir), depth_net)
    rates: dict[str, list[float]] = {}
    with scratch_database("archfarm_overhead") as database_url:
        try:
            measure(args, database_url, work, models_dir, depth_net, seeds, reps, images, rates)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report(args, rates, images, reps)


def measure(
    args: argparse.Namespace,
    database_url: str,
    work: Path,
    models_dir: Path,
    depth_net: str,
    seeds: int,
    reps: int,
    images: int,
    rates: dict[str, list[float]],
) -> None:
    farm_environment(database_url, work, models_dir, "overhead")
    loop = plain_loop(models_dir, depth_net, args.size, args.steps, seeds)
    rates["plain"] = repeat("plain loop", images, reps, lambda rep: loop(work / f"plain-{rep}"))
    embedded = Embedded(Settings(broker_url=None))
    rates["inprocess"] = repeat(
        "in-process",
        images,
        reps,
        lambda rep: embedded.render(job(seeds, args.size, args.steps, depth_net, work / f"inprocess-{rep}")),
    )
    embedded.close()
    for workers in (1, 2):
        rates[f"distributed_{workers}"] = distributed(workers, images, reps, seeds, args, depth_net, work)


def report(args: argparse.Namespace, rates: dict[str, list[float]], images: int, reps: int) -> None:
    plain = median(rates["plain"])
    results: dict[str, Any] = {
        "images_per_run": images,
        "size": args.size,
        "steps": args.steps,
        "reps": reps,
        "plain_images_per_s": plain,
        "plain_seconds_per_image": 1 / plain,
    }
    for name in ("inprocess", "distributed_1", "distributed_2"):
        results[f"{name}_images_per_s"] = median(rates[name])
        results[f"{name}_ratio"] = median(rates[name]) / plain
        results[f"{name}_spread"] = [min(rates[name]) / plain, max(rates[name]) / plain]
    print(f"{'variant':<16} {'images/s':>9} {'ratio':>7}")
    for name in ("plain", "inprocess", "distributed_1", "distributed_2"):
        print(f"{name:<16} {median(rates[name]):9.3f} {median(rates[name]) / plain:7.3f}")
    if args.json:
        print(json.dumps(results))


def distributed(
    workers: int, images: int, reps: int, seeds: int, args: argparse.Namespace, depth_net: str, work: Path
) -> list[float]:
    with cpu_workers(workers, work) as farm:

        def run(rep: int) -> None:
            job_id = farm.submit(job(seeds, args.size, args.steps, depth_net, work / f"dist{workers}-{rep}"))
            view = farm.wait(job_id, poll=0.02)
            if view.status.value != "succeeded":
                raise SystemExit(f"job ended {view.status.value}: {view.failures[:1]}")

        return repeat(f"{workers} worker(s)", images, reps, run)


if __name__ == "__main__":
    main()
