"""Engine benchmark on tiny models (CPU here, any device elsewhere): batching, compile, window skipping, swaps.

    python bench/engine.py [--quick] [--json] [--sizes 64,256] [--compile-backend inductor]

For each size: images/s with seeds_per_task 1 vs 4; four tasks (two plans × two styles) in one call vs a
call each, as a worker batches them; steady-state seconds per render eager vs compiled
(the first compiled call is reported apart); with and without skipping ControlNets outside their
control_guidance window; at the first size, an SDXL ControlNet-Union with two modes against two SDXL
ControlNets, and two SD 1.5 T2I-Adapters against two ControlNets; then ControlNet swap cost from the offload
tier vs from disk, and loads, swaps and evictions for a sequence of tasks mixing two stacks, in archfarm's order
(grouped) vs arrival order.
All comparisons run side by side in one process; read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import report, side_by_side
from workers.engine.compile import CompileOptions
from workers.engine.models import ModelCache, module_bytes
from workers.engine.pipeline import ControlInput, Item, Request, Unit, render, render_batch
from workers.engine.presets import resolve
from workers.preprocessors.canny import AdaptiveCanny
from workers.preprocessors.plan_depth import PlanDepth

PLAN = Path(__file__).resolve().parents[1] / "examples" / "floorplan.png"
PROMPT = "modern interior design, clean lines, natural light"
OTHER_PROMPT = "industrial loft interior, exposed brick, concrete floor"


def measure_size(
    cache: ModelCache, plan: Image.Image, size: int, steps: int, repeats: int, backend: str
) -> dict[str, float]:
    """Batching, window skipping and compile at one render size."""
    edges = AdaptiveCanny()(plan, size, size)
    depth = PlanDepth()(plan, size, size)
    one = [ControlInput("tiny-canny", edges, 0.9, 0.0, 1.0)]
    windowed = [ControlInput("tiny-canny", edges, 0.9, 0.0, 0.5), ControlInput("tiny-canny", depth, 0.6, 0.5, 1.0)]
    options = CompileOptions(backend=backend)

    def run(controls: list[ControlInput], seeds: list[int], **extra: Any) -> object:
        return render(
            cache,
            base="tiny-sd15",
            controls=controls,
            prompt=PROMPT,
            negative_prompt="",
            seeds=seeds,
            steps=steps,
            guidance_scale=7.5,
            width=size,
            height=size,
            scheduler="ddim",
            **extra,
        )

    single, batch = side_by_side(lambda: run(one, [0]), lambda: run(one, [0, 1, 2, 3]), repeats)
    # Four tasks of a job (two plans × two styles) in one call, as a worker batches them, vs a call each.
    tasks = [
        Item(prompt, "", seed, (maps,))
        for seed, (prompt, maps) in enumerate(
            [(PROMPT, edges), (PROMPT, depth), (OTHER_PROMPT, edges), (OTHER_PROMPT, depth)]
        )
    ]
    units = [Unit("tiny-canny", 0.9, 0.0, 1.0)]

    def call(items: list[Item]) -> object:
        return render_batch(
            cache,
            Request(
                base="tiny-sd15",
                units=units,
                items=items,
                steps=steps,
                guidance_scale=7.5,
                width=size,
                height=size,
                scheduler="ddim",
            ),
        )

    apart, together = side_by_side(lambda: [call([t]) for t in tasks], lambda: call(tasks), repeats)
    skip, noskip = side_by_side(
        lambda: run(windowed, [0]), lambda: run(windowed, [0], skip_outside_window=False), repeats
    )
    started = time.perf_counter()
    run(one, [0], compile=options)
    first_compiled = time.perf_counter() - started
    eager, compiled = side_by_side(lambda: run(one, [0]), lambda: run(one, [0], compile=options), repeats)
    return {
        f"{size}_images_per_s_batch1": 1 / single,
        f"{size}_images_per_s_batch4": 4 / batch,
        f"{size}_batch4_speedup": single * 4 / batch,
        f"{size}_4_tasks_apart_s": apart,
        f"{size}_4_tasks_one_call_s": together,
        f"{size}_4_tasks_speedup": apart / together,
        f"{size}_window_skip_s": skip,
        f"{size}_window_noskip_s": noskip,
        f"{size}_window_saving": 1 - skip / noskip,
        f"{size}_compile_first_call_s": first_compiled,
        f"{size}_eager_s": eager,
        f"{size}_compiled_s": compiled,
        f"{size}_compiled_speedup": eager / compiled,
    }


def union_against_two(
    cache: ModelCache, plan: Image.Image, size: int, steps: int, repeats: int, work: Path
) -> dict[str, float]:
    """Tiny SDXL steered by edges and plan depth: one ControlNet-Union running both as modes in one pass per
    step, against two ControlNets (two passes per step), side by side."""
    edges, depth = AdaptiveCanny()(plan, size, size), PlanDepth()(plan, size, size)
    second = work / "sdxl-controlnet-b"
    shutil.copytree(resolve("tiny-sdxl-controlnet", cache.models_dir), second, dirs_exist_ok=True)

    def call(units: list[Unit], modes: tuple[int, ...] | None) -> object:
        item = Item(PROMPT, "", 0, (edges, depth))
        request = Request("tiny-sdxl", units, [item], steps, 7.5, size, size, modes=modes)
        return render_batch(cache, request)

    two = [Unit("tiny-sdxl-controlnet", 0.6, 0.0, 1.0), Unit(str(second), 0.5, 0.0, 1.0)]
    union = [Unit("tiny-sdxl-union", 0.6, 0.0, 1.0), Unit("tiny-sdxl-union", 0.5, 0.0, 1.0)]
    two_s, union_s = side_by_side(lambda: call(two, None), lambda: call(union, (3, 1)), repeats)
    return {
        f"{size}_sdxl_two_controlnets_s": two_s,
        f"{size}_sdxl_union_two_modes_s": union_s,
        f"{size}_union_over_two": union_s / two_s,
    }


def adapters_against_controlnets(
    cache: ModelCache, plan: Image.Image, size: int, steps: int, repeats: int
) -> dict[str, float]:
    """Tiny SD 1.5 steered by edges and plan depth: two T2I-Adapters (run once per call, their features added at
    every step) against two ControlNets (a pass each per step), side by side."""
    edges, depth = AdaptiveCanny()(plan, size, size), PlanDepth()(plan, size, size)

    def call(net: str, adapters: bool) -> object:
        units = [Unit(net, 0.9, 0.0, 1.0), Unit(net, 0.6, 0.0, 1.0)]
        request = Request("tiny-sd15", units, [Item(PROMPT, "", 0, (edges, depth))], steps, 7.5, size, size)
        return render_batch(cache, replace(request, adapters=adapters))

    nets_s, adapters_s = side_by_side(
        lambda: call("tiny-canny", False), lambda: call("tiny-sd15-adapter", True), repeats
    )
    return {
        f"{size}_sd15_two_controlnets_s": nets_s,
        f"{size}_sd15_two_adapters_s": adapters_s,
        f"{size}_adapters_over_controlnets": adapters_s / nets_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64×64 only, aot_eager compile, few repeats")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--sizes", default="64,256", help="square render sizes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile-backend", default="inductor", help="inductor (minutes on CPU) or aot_eager")
    parser.add_argument("--models-dir", type=Path, default=None, help="model cache folder (default: temporary)")
    args = parser.parse_args()
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    steps = 4 if args.quick else args.steps
    repeats = 2 if args.quick else 5
    backend = "aot_eager" if args.quick else args.compile_backend
    work = Path(tempfile.mkdtemp(prefix="archfarm-engine-bench-"))
    models_dir = args.models_dir or work / "models"
    device = torch.device("cpu")
    results: dict[str, Any] = {"device": str(device), "steps": steps, "threads": torch.get_num_threads()}
    try:
        cache = ModelCache(models_dir, device, torch.float32)
        plan = Image.open(PLAN).convert("RGB")
        for size in sizes:
            results.update(measure_size(cache, plan, size, steps, repeats, backend))
        results["compile_backend"] = backend

        # Swapping a ControlNet: back from the offload tier vs read from disk.
        other = work / "canny-b"
        shutil.copytree(resolve("tiny-canny", models_dir), other)
        budget = module_bytes(cache.controlnet("tiny-canny"))
        swap_cache = ModelCache(models_dir, device, torch.float32, controlnet_budget_bytes=budget)
        swap_cache.controlnet("tiny-canny")
        started = time.perf_counter()
        swap_cache.controlnet(str(other))  # from disk; evicts tiny-canny to the offload tier
        results["controlnet_from_disk_ms"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        swap_cache.controlnet("tiny-canny")  # back from the offload tier
        results["controlnet_from_offload_ms"] = (time.perf_counter() - started) * 1000

        results.update(union_against_two(cache, plan, sizes[0], steps, repeats, work))
        results.update(adapters_against_controlnets(cache, plan, sizes[0], steps, repeats))

        # Two stacks, 16 tasks, a device budget of one ControlNet: grouped vs interleaved arrival.
        size = sizes[0]
        edges = AdaptiveCanny()(plan, size, size)
        for order in ("grouped", "interleaved"):
            mixed = ModelCache(
                models_dir, device, torch.float32, controlnet_budget_bytes=budget, offload_budget_bytes=0
            )
            stacks = ["tiny-canny"] * 8 + [str(other)] * 8
            if order == "interleaved":
                stacks = [s for pair in zip(stacks[:8], stacks[8:], strict=True) for s in pair]
            started = time.perf_counter()
            for net in stacks:
                render(
                    mixed,
                    base="tiny-sd15",
                    controls=[ControlInput(net, edges, 0.9, 0.0, 1.0)],
                    prompt=PROMPT,
                    negative_prompt="",
                    seeds=[0],
                    steps=steps,
                    guidance_scale=7.5,
                    width=size,
                    height=size,
                    scheduler="ddim",
                )
            results[f"{order}_16_tasks_s"] = time.perf_counter() - started
            results[f"{order}_controlnet_loads"] = sum(mixed.loads.values()) - 1  # minus the base
            results[f"{order}_swaps"] = mixed.swaps
            results[f"{order}_evictions"] = sum(mixed.evictions.values())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report(results, args.json)


if __name__ == "__main__":
    main()
