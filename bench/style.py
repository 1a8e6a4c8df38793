"""Style packs on tiny models (CPU here, any device elsewhere): what a pack costs per image, and what swapping a
style's LoRA costs a worker.

    python bench/style.py [--quick] [--json] [--size 128] [--steps 20]

Seconds per image of one render of the example plan (tiny SD 1.5 + `tiny-plan`): the bare style against the
same style with a pack (a rank-8 LoRA and a one-image mood board through the tiny IP-Adapter), alternating,
medians. Then changing a resident UNet's LoRA: in place (`hotswap`, what a worker does between styles) against
unloading it and loading the next (what a worker without hotswap does), on a UNet compiled with `aot_eager`
(eager with `--quick`), with the graphs each way compiles anew.
All comparisons run side by side in one process; read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import report, side_by_side
from workers.engine.compile import CompileOptions, compile_module
from workers.engine.loras import ADAPTER, Lora, lora_state_dict
from workers.engine.models import ModelCache
from workers.engine.moodboards import Board, IPAdapter
from workers.engine.pipeline import Item, Request, Unit, render_batch
from workers.engine.presets import resolve
from workers.engine.tiny import IP_ADAPTER_WEIGHTS, style_lora
from workers.preprocessors.plan_depth import PlanDepth

PLAN = Path(__file__).resolve().parents[1] / "examples" / "floorplan.png"
PROMPT = "modern interior design, clean lines, natural light"


def pack_cost(cache: ModelCache, loras: list[Path], size: int, steps: int, repeats: int) -> dict[str, float]:
    """One image with the bare style against one with a LoRA and a mood board, alternating."""
    plan = PlanDepth()(Image.open(PLAN).convert("RGB"), size, size)
    board_image = Image.new("RGB", (64, 64), (200, 140, 90))
    board = Board((board_image,), (hashlib.sha256(board_image.tobytes()).hexdigest(),), 0.8, "style")
    adapter = IPAdapter(
        "tiny-ip-adapter", resolve("tiny-ip-adapter", cache.models_dir), IP_ADAPTER_WEIGHTS, "image_encoder"
    )
    lora = Lora(str(loras[0]), 1.0, "a" * 64)

    def call(packed: bool) -> object:
        request = Request(
            "tiny-sd15",
            [Unit("tiny-plan", 1.0, 0.0, 1.0)],
            [Item(PROMPT, "", 0, (plan,))],
            steps,
            7.5,
            size,
            size,
            lora=lora if packed else None,
            board=board if packed else None,
            ip_adapter=adapter if packed else None,
        )
        return render_batch(cache, request)

    bare_s, pack_s = side_by_side(lambda: call(False), lambda: call(True), repeats)
    return {"bare_s": bare_s, "pack_s": pack_s, "pack_over_bare": pack_s / bare_s}


def swap_cost(models_dir: Path, loras: list[Path], repeats: int, compiled: bool) -> dict[str, float]:
    """A resident UNet's LoRA changed in place against unloaded and loaded again; with `compiled`, on a UNet
    compiled with aot_eager, and the graphs compiled anew each way."""
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    base = Path(resolve("tiny-sd15", models_dir))
    states = [lora_state_dict(Lora(str(path), 1.0, "x" * 64)) for path in loras]
    sample, timestep, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    results: dict[str, float] = {}
    for way in ("hotswap", "reload"):
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        unet.enable_lora_hotswap(target_rank=128)
        unet.load_lora_adapter(states[0], adapter_name=ADAPTER, prefix="unet")
        model = compile_module(unet, CompileOptions(mode="default", backend="aot_eager")) if compiled else unet
        with torch.no_grad():
            model(sample, timestep, text)
        graphs, took = counters["stats"]["unique_graphs"], []
        for index in range(repeats):
            state = states[(index + 1) % 2]
            started = time.perf_counter()
            if way == "hotswap":
                unet.load_lora_adapter(state, adapter_name=ADAPTER, prefix="unet", hotswap=True)
            else:
                unet.delete_adapters([ADAPTER])
                unet.load_lora_adapter(state, adapter_name=ADAPTER, prefix="unet")
            took.append(time.perf_counter() - started)
            with torch.no_grad():
                model(sample, timestep, text)
        results[f"{way}_ms"] = median(took) * 1000
        if compiled:
            results[f"{way}_new_graphs"] = counters["stats"]["unique_graphs"] - graphs
    results["reload_over_hotswap"] = results["reload_ms"] / results["hotswap_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64×64, 8 steps, few repeats, swaps on an eager UNet")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models-dir", type=Path, default=None, help="model cache folder (default: temporary)")
    args = parser.parse_args()
    size, steps, repeats = (64, 8, 3) if args.quick else (args.size, args.steps, 7)
    work = Path(tempfile.mkdtemp(prefix="archfarm-style-bench-"))
    models_dir = args.models_dir or work / "models"
    base = Path(resolve("tiny-sd15", models_dir))
    loras = [style_lora(base, work / f"lora-{seed}", seed, rank=8) for seed in (1, 2)]
    results: dict[str, Any] = {"device": "cpu", "size": size, "steps": steps, "threads": torch.get_num_threads()}
    results.update(pack_cost(ModelCache(models_dir, torch.device("cpu"), torch.float32), loras, size, steps, repeats))
    results.update(swap_cost(models_dir, loras, repeats, compiled=not args.quick))
    report(results, args.json)


if __name__ == "__main__":
    main()
