"""Each benchmark's --quick mode runs from a clean state and prints well-formed results (not timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.dispatch import MIN_WINDOW

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, models_dir: Path, redis_url: str = "", timeout: int = 600) -> dict:
    env = {**os.environ, "ARCHFARM_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1"}
    if redis_url:
        env["ARCHFARM_BENCH_REDIS_URL"] = redis_url  # this test session's own Redis database
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    return json.loads(last)


def positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


def test_engine_quick(models_dir: Path) -> None:
    out = run_bench("engine.py", "--quick", "--models-dir", str(models_dir), models_dir=models_dir)
    for key in (
        "64_images_per_s_batch1",
        "64_images_per_s_batch4",
        "64_4_tasks_speedup",
        "64_window_skip_s",
        "64_window_noskip_s",
        "64_eager_s",
        "64_compiled_s",
        "controlnet_from_disk_ms",
        "controlnet_from_offload_ms",
        "64_sdxl_two_controlnets_s",
        "64_sdxl_union_two_modes_s",
        "64_sd15_two_adapters_s",
    ):
        assert positive(out[key]), key
    assert out["64_union_over_two"] == out["64_sdxl_union_two_modes_s"] / out["64_sdxl_two_controlnets_s"]
    assert out["grouped_controlnet_loads"] < out["interleaved_controlnet_loads"]  # counts, not timings
    assert out["grouped_swaps"] == 1 and out["interleaved_swaps"] == 15


def test_style_quick(models_dir: Path) -> None:
    out = run_bench("style.py", "--quick", "--models-dir", str(models_dir), models_dir=models_dir)
    assert positive(out["bare_s"]) and positive(out["pack_s"]) and positive(out["hotswap_ms"])
    assert out["pack_over_bare"] == out["pack_s"] / out["bare_s"] and positive(out["reload_ms"])


def test_stages_quick(models_dir: Path) -> None:
    out = run_bench("stages.py", "--quick", "--seeds", "4", "--size", "128", "--steps", "8", models_dir=models_dir)
    assert (out["seeds"], out["size"], out["steps"]) == (4, 128, 8)
    assert positive(out["full_s"]) and positive(out["staged_s"]) and positive(out["ratio_measured"])
    assert out["ratio_formula"] == round((4 * 0.25 * 12 + 2 * 4) / (4 * 8), 3)


def test_train_bench_quick(models_dir: Path) -> None:
    out = run_bench(
        "train.py", "--quick", "--device", "cpu", "--tiny", "--models-dir", str(models_dir), models_dir=models_dir
    )
    assert out["device"] == "cpu" and out["models"] == "tiny-sd15"
    assert out["resolution"] == 64 and out["batch"] == 2 and out["steps"] == 4
    for variant in ("plain", "archfarm"):
        assert positive(out[variant]["samples_per_s"]) and positive(out[variant]["peak_mb"]), variant
        assert len(out[variant]["runs"]) == out["repeats"], variant
    assert positive(out["throughput_ratio"]) and positive(out["memory_ratio"])


@pytest.mark.postgres
@pytest.mark.redis
def test_state_quick(postgres_url: str, redis_url: str, models_dir: Path) -> None:
    out = run_bench("state.py", "--quick", models_dir=models_dir, redis_url=redis_url)
    assert out["dispatch_messages"] == 2000 and positive(out["10000_submit_s"]) and positive(out["dispatch_per_s"])
    assert out["10000_broker_messages"] == MIN_WINDOW and positive(out["10000_broker_kib"])  # a window, not the job
    for path in ("job", "jobs_list", "results_page", "sheet_page", "dashboard_job", "metrics", "claim_and_finish"):
        p50, p95 = out[f"10000_{path}_ms"]
        assert 0 < p50 <= p95, path


@pytest.mark.postgres
@pytest.mark.redis
def test_farm_quick(postgres_url: str, redis_url: str, models_dir: Path) -> None:
    out = run_bench("farm.py", "--quick", models_dir=models_dir, redis_url=redis_url)
    assert out["tasks"] == 8
    assert positive(out["inprocess_wall_s"]) and positive(out["distributed_2_wall_s"])
    assert len(out["grouped_swaps_per_worker"]) == 2


@pytest.mark.postgres
@pytest.mark.redis
def test_overhead_quick(postgres_url: str, redis_url: str, models_dir: Path) -> None:
    out = run_bench(
        "overhead.py",
        "--quick",
        "--reps",
        "1",
        "--size",
        "64",
        "--steps",
        "3",
        models_dir=models_dir,
        redis_url=redis_url,
    )
    assert (out["images_per_run"], out["size"], out["steps"], out["reps"]) == (4, 64, 3, 1)
    assert positive(out["plain_images_per_s"])
    for name in ("inprocess", "distributed_1", "distributed_2"):
        # Every variant rendered its images (a rate is images over seconds), and each ratio is its own rate over
        # the plain loop's, with one repetition as its whole spread.
        ratio = out[f"{name}_images_per_s"] / out["plain_images_per_s"]
        assert out[f"{name}_ratio"] == pytest.approx(ratio) and out[f"{name}_spread"] == pytest.approx([ratio] * 2)


@pytest.mark.postgres
@pytest.mark.redis
def test_upscale_quick(postgres_url: str, redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    crop = tmp_path / "crop.png"
    out = run_bench("upscale.py", "--quick", "--crop", str(crop), models_dir=models_dir, redis_url=redis_url)
    assert (out["size"], out["tiles"]) == ("512x256", 15)
    assert positive(out["wall_s_1_workers"]) and out["speedup_1_workers"] == 1
    assert out["seam_blended"] < out["seam_pasted"]  # the same tiles, blended and pasted
    assert out["assembly_output_mib"] == 512 * 256 * 3 / 2**20 and crop.is_file()


def gpu_bench(*args: str, models_dir: Path, script: str = "gpu.py") -> dict:
    """A GPU benchmark's JSON lines on a CPU with tiny models, one measurement each, as {label: value}."""
    env = {**os.environ, "ARCHFARM_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "bench" / script), "--device", "cpu", "--tiny", "--json", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {line["measure"]: line["value"] for line in lines}


def test_gpu_script_smoke_on_cpu(models_dir: Path) -> None:
    out = gpu_bench("--quick", "--only", "sd15", models_dir=models_dir)
    assert out["device"] == "cpu" and positive(out["peak_tflops"])
    assert not [label for label in out if label.endswith(("failed", "skipped"))], out
    for key in (
        "sd15 archviz job through the farm",
        "sd15 archviz job, plain diffusers loop",
        "sd15 plain pipeline b1",
        "sd15 archfarm engine b1",
        "sd15 archfarm engine b4",
        "sd15 archfarm engine b4, channels_last",
        "sd15 archfarm engine b4, fused QKV",
        "sd15 archfarm engine b4, unipc",
        "sd15 archfarm engine b4, dpmpp_2m",
    ):
        assert positive(out[key]["images_per_s"]) and positive(out[key]["tflops"]), key


def test_gpu_script_stops_at_its_time_budget_and_says_so(models_dir: Path) -> None:
    out = gpu_bench("--quick", "--budget", "0", models_dir=models_dir)
    assert out["sd15 skipped"] == out["sdxl skipped"] == "time budget spent" and positive(out["peak_tflops"])


def test_one_ahead_of_time_package_serves_two_controlnets(models_dir: Path) -> None:
    """bench/aot.py's AOTInductor way: a package compiled with one ControlNet's shapes and no weights of its own,
    loaded twice with two nets' weights, agrees with each net run eagerly, and the two nets differ."""
    out = gpu_bench("--quick", "--only", "aoti", models_dir=models_dir, script="aot.py")
    assert not [label for label in out if label.endswith(("failed", "skipped"))], out
    assert out["controlnet aoti-warm: difference from eager"] < 1e-4
    assert out["controlnet aoti-warm: second net: difference from its eager"] < 1e-4
    assert out["controlnet aoti-warm: second net: difference from the first"] > 0.1
    assert positive(out["controlnet aoti-cold: package MB"]) and positive(out["controlnet aoti-warm: first call s"])
