"""The model cache under a memory budget: what a sequence of renders loads, keeps, offloads, restores and drops.

Counts are exact: they are what a worker's throughput depends on (a load costs seconds, a restore from the
offload tier milliseconds, a hit nothing). On this CPU the moves between tiers cost nothing, but the tiers and
counters behave as on a GPU.
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from shared.errors import ConfigError, InvalidInput
from workers.engine.compile import CompileOptions
from workers.engine.models import ModelCache, module_bytes
from workers.engine.pipeline import ControlInput, render
from workers.engine.presets import resolve

SIZE = 64


def plan() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    ImageDraw.Draw(image).rectangle((4, 4, 40, 30), outline="white", width=2)
    return image


PLAN = plan()


@pytest.fixture(scope="module")
def nets(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Three ControlNets of one size: tiny-canny and two copies, which the cache tells apart by location."""
    folder = tmp_path_factory.mktemp("nets")
    source = Path(resolve("tiny-canny", models_dir))
    for name in ("b", "c"):
        shutil.copytree(source, folder / name)
    return {"a": "tiny-canny", "b": str(folder / "b"), "c": str(folder / "c")}


@pytest.fixture(scope="module")
def net_bytes(models_dir: Path) -> int:
    return module_bytes(ModelCache(models_dir, torch.device("cpu"), torch.float32).controlnet("tiny-canny"))


def cache_for(models_dir: Path, **budgets: int | None) -> ModelCache:
    return ModelCache(models_dir, torch.device("cpu"), torch.float32, **budgets)


def draw(cache: ModelCache, *refs: str, quantize: str | None = None, output_type: str = "pil"):
    return render(
        cache,
        base="tiny-sd15",
        controls=[ControlInput(ref, PLAN, 1.0, 0.0, 1.0) for ref in refs],
        prompt="a bright living room",
        negative_prompt="",
        seeds=[1],
        steps=1,
        guidance_scale=7.5,
        width=SIZE,
        height=SIZE,
        scheduler="ddim",
        quantize=quantize,
        output_type=output_type,
    )


def location(cache: ModelCache, ref: str) -> str:
    return resolve(ref, cache.models_dir)


def counts(cache: ModelCache, *refs: str) -> dict[str, list[int]]:
    """Per counter, its value for each of `refs` (ControlNets), in order."""
    keys = [location(cache, ref) for ref in refs]
    counters = {
        "loads": cache.loads,
        "hits": cache.hits,
        "restores": cache.restores,
        "evictions": cache.evictions,
        "drops": cache.drops,
    }
    return {name: [counter[key] for key in keys] for name, counter in counters.items()}


@pytest.mark.slow
def test_same_stack_twice_loads_nothing_the_second_time(models_dir: Path, nets: dict[str, str]) -> None:
    cache = cache_for(models_dir)
    draw(cache, nets["a"])
    loads = Counter(cache.loads)
    draw(cache, nets["a"])
    assert cache.loads == loads and cache.swaps == 0
    assert cache.hits == Counter({location(cache, "tiny-sd15"): 1, location(cache, nets["a"]): 1})


@pytest.mark.slow
def test_stack_change_moves_only_the_controlnet(models_dir: Path, nets: dict[str, str], net_bytes: int) -> None:
    cache = cache_for(models_dir, controlnet_budget_bytes=net_bytes)
    draw(cache, nets["a"])
    draw(cache, nets["b"])
    assert cache.loads[location(cache, "tiny-sd15")] == 1 and cache.hits[location(cache, "tiny-sd15")] == 1
    assert counts(cache, nets["a"], nets["b"]) == {
        "loads": [1, 1],
        "hits": [0, 0],
        "restores": [0, 0],
        "evictions": [1, 0],
        "drops": [0, 0],
    }
    assert cache.resident() == [location(cache, "tiny-sd15"), location(cache, nets["b"])]
    assert cache.swaps == 1


@pytest.mark.slow
def test_budget_of_one_net_offloads_and_restores(models_dir: Path, nets: dict[str, str], net_bytes: int) -> None:
    cache = cache_for(models_dir, controlnet_budget_bytes=net_bytes)
    for ref in (nets["a"], nets["b"], nets["a"]):
        draw(cache, ref)
    assert counts(cache, nets["a"], nets["b"]) == {
        "loads": [1, 1],
        "hits": [0, 0],
        "restores": [1, 0],
        "evictions": [1, 1],
        "drops": [0, 0],
    }
    assert cache.resident() == [location(cache, "tiny-sd15"), location(cache, nets["a"])]
    assert cache.swaps == 2


@pytest.mark.slow
def test_full_offload_tier_drops_and_reloads(models_dir: Path, nets: dict[str, str], net_bytes: int) -> None:
    cache = cache_for(models_dir, controlnet_budget_bytes=net_bytes, offload_budget_bytes=0)
    for ref in (nets["a"], nets["b"], nets["a"]):
        draw(cache, ref)
    assert counts(cache, nets["a"], nets["b"]) == {
        "loads": [2, 1],
        "hits": [0, 0],
        "restores": [0, 0],
        "evictions": [1, 1],
        "drops": [1, 1],
    }


@pytest.mark.slow
def test_offload_tier_drops_its_least_recently_used(models_dir: Path, nets: dict[str, str], net_bytes: int) -> None:
    cache = cache_for(models_dir, controlnet_budget_bytes=net_bytes, offload_budget_bytes=net_bytes)
    for ref in (nets["a"], nets["b"], nets["c"], nets["b"], nets["a"]):
        draw(cache, ref)
    # a → offload; b → offload, a dropped; c → offload, b restored; b → offload, c dropped; a reloaded.
    assert counts(cache, nets["a"], nets["b"], nets["c"]) == {
        "loads": [2, 1, 1],
        "hits": [0, 0, 0],
        "restores": [0, 1, 0],
        "evictions": [1, 2, 1],
        "drops": [1, 0, 1],
    }


@pytest.mark.slow
def test_nets_of_the_current_render_are_never_evicted(models_dir: Path, nets: dict[str, str], net_bytes: int) -> None:
    cache = cache_for(models_dir, controlnet_budget_bytes=net_bytes)
    draw(cache, nets["a"], nets["b"])  # two nets over a budget of one: both stay for this render
    assert sum(cache.evictions.values()) == 0
    draw(cache, nets["a"], nets["b"])
    assert counts(cache, nets["a"], nets["b"])["hits"] == [1, 1]
    draw(cache, nets["c"])  # room for c: both of the earlier render's nets leave
    assert counts(cache, nets["a"], nets["b"], nets["c"])["evictions"] == [1, 1, 0]
    assert cache.resident() == [location(cache, "tiny-sd15"), location(cache, nets["c"])]


def test_a_dropped_net_is_freed_also_when_compiled(models_dir: Path, nets: dict[str, str], net_bytes: int) -> None:
    cache = cache_for(models_dir, controlnet_budget_bytes=net_bytes, offload_budget_bytes=0)
    net = cache.controlnet(nets["a"])
    assert cache.compiled(net, CompileOptions(backend="eager")) is cache.compiled(net, CompileOptions(backend="eager"))
    freed = weakref.ref(net)
    del net
    cache.controlnet(nets["b"])
    gc.collect()
    assert sum(cache.drops.values()) == 1 and freed() is None


@pytest.mark.slow
def test_mixed_stacks_count_swaps_and_keep_resident_nets(models_dir: Path, nets: dict[str, str]) -> None:
    cache = cache_for(models_dir)
    for stack in ([nets["a"]], [nets["a"]], [nets["b"]], [nets["a"], nets["b"]], [nets["a"], nets["b"]], [nets["a"]]):
        draw(cache, *stack)
    assert cache.swaps == 3
    assert counts(cache, nets["a"], nets["b"]) == {
        "loads": [1, 1],
        "hits": [4, 2],
        "restores": [0, 0],
        "evictions": [0, 0],
        "drops": [0, 0],
    }


def test_restoring_from_the_offload_tier_beats_a_disk_load(
    models_dir: Path, nets: dict[str, str], net_bytes: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prints both times for the benchmark; on a CPU device a restore moves nothing, on a GPU it copies."""
    cache = cache_for(models_dir, controlnet_budget_bytes=net_bytes)
    timings: dict[str, list[float]] = {"load": [], "restore": []}
    for round_ in range(3):
        for ref in (nets["a"], nets["b"]):
            started = time.perf_counter()
            cache.controlnet(ref)
            timings["restore" if round_ else "load"].append(time.perf_counter() - started)
    assert sum(cache.restores.values()) == 4 and sum(cache.loads.values()) == 2
    load, restore = (float(np.median(timings[kind])) for kind in ("load", "restore"))
    with capsys.disabled():
        print(
            f"\n  tiny ControlNet ({net_bytes / 1e6:.1f} MB): disk load {load * 1e3:.1f} ms, "
            f"restore from offload tier {restore * 1e3:.3f} ms ({cache.device})"
        )
    assert restore < load


# --- int8 ControlNets -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_controlnet_is_quantised_and_cached_apart(models_dir: Path) -> None:
    pytest.importorskip("torchao", reason="int8 quantisation needs the torchao package (pip install torchao)")
    cache = cache_for(models_dir)
    full = draw(cache, "tiny-canny", output_type="np").images[0]
    int8 = draw(cache, "tiny-canny", quantize="int8", output_type="np").images[0]
    plain, quantised = cache.controlnet("tiny-canny"), cache.controlnet("tiny-canny", quantize="int8")
    assert plain is not quantised
    key = location(cache, "tiny-canny")
    assert cache.loads[key] == cache.loads[f"{key} (int8)"] == 1
    # torchao swaps each Linear weight for a tensor subclass holding int8 data and a scale per row.
    weight = quantised.time_embedding.linear_1.weight
    assert type(weight) is not type(plain.time_embedding.linear_1.weight)
    assert weight.__tensor_flatten__()[0][0] == "qdata" and weight.qdata.dtype == torch.int8
    assert module_bytes(quantised) < module_bytes(plain)
    assert np.isfinite(int8).all() and 0 < np.abs(int8 - full).max() < 0.1  # close, not the same numbers


def test_quantisation_problems_say_what_is_wrong(model_cache: ModelCache, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInput, match="unknown quantisation 'int4'"):
        model_cache.controlnet("tiny-canny", quantize="int4")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed: this node's
    with pytest.raises(ConfigError, match="needs the torchao package"):
        model_cache.controlnet("tiny-canny", quantize="int8")
