"""The render engine on the tiny presets: registry, model cache, and what a render promises.

Tiny random models cannot draw a plan, so control plumbing is checked on float outputs and by scale 0
against scale > 0 (docs/tiny-models.md), never by looking for the plan in the picture.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline
from PIL import Image
from torch._dynamo import register_backend
from torch._dynamo.utils import counters as dynamo_counters

from shared.errors import ConfigError, InvalidInput, ModelError
from shared.registry import ALIASES, PRESETS, SCHEDULERS, default_controlnet
from tests.models_fixture import PLAN_A, PLAN_B, SIZE, STEPS, tiny_render
from workers.engine import pipeline, presets
from workers.engine.compile import CompileOptions
from workers.engine.models import ModelCache, default_dtype, pick_device, weights_sha256
from workers.engine.pipeline import ControlInput
from workers.engine.presets import resolve

run = functools.partial(tiny_render, base="tiny-sd15", net="tiny-canny")


def floats(cache: ModelCache, control: ControlInput) -> np.ndarray:
    return run(cache, controls=[control], output_type="np").images[0]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- presets and registry ---------------------------------------------------------------------------------


def test_presets_build_offline_and_load_with_from_pretrained(models_dir: Path) -> None:
    base = Path(resolve("tiny-sd15", models_dir))
    index = json.loads((base / "model_index.json").read_text())
    assert "controlnet" not in index  # so the folder also loads with a list of ControlNets
    assert index["safety_checker"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.in_channels == 4 and pipe.vae_scale_factor == 8

    controlnet = ControlNetModel.from_pretrained(resolve("tiny-canny", models_dir))
    assert controlnet.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convs.append(controlnet.controlnet_cond_embedding.conv_out)
    assert all(conv.weight.abs().sum() > 0 for conv in zero_convs)


def test_building_is_deterministic(models_dir: Path, tmp_path: Path) -> None:
    for name in PRESETS:
        assert weights_sha256(Path(resolve(name, tmp_path))) == weights_sha256(Path(resolve(name, models_dir)))


def test_second_resolve_reuses_the_folder(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve("tiny-sd15", models_dir)

    def must_not_build(folder: Path) -> None:
        raise AssertionError("rebuilt a preset that was already there")

    monkeypatch.setitem(presets.BUILDERS, "tiny-sd15", must_not_build)
    assert resolve("tiny-sd15", models_dir) == first


def test_racing_builders_both_get_one_complete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hold both threads inside the builder until both are there, so both build and one rename must lose.
    inside = threading.Barrier(2, timeout=60)
    build = presets.BUILDERS["tiny-canny"]

    def build_together(folder: Path) -> None:
        inside.wait()
        build(folder)

    monkeypatch.setitem(presets.BUILDERS, "tiny-canny", build_together)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve("tiny-canny", tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(results[0]).name]  # the loser's copy is gone
    ControlNetModel.from_pretrained(results[0])


def test_resolve_kinds_of_reference(tmp_path: Path) -> None:
    assert resolve("sd15", tmp_path) == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve("sdxl-canny", tmp_path) == "diffusers/controlnet-canny-sdxl-1.0"
    assert resolve("someone/some-model", tmp_path) == "someone/some-model"
    assert resolve(str(tmp_path), tmp_path / "elsewhere") == str(tmp_path.resolve())
    # A folder missing here is still a folder: loading it fails, naming this machine's path.
    assert resolve(str(tmp_path / "nope"), tmp_path) == str(tmp_path.resolve() / "nope")
    with pytest.raises(ModelError, match="unknown model 'not a model'"):
        resolve("not a model", tmp_path)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.usefixtures("hub_offline")
def test_default_controlnet(models_dir: Path, model_cache: ModelCache) -> None:
    for kind in ("canny", "depth", "plan-depth", "none", "image"):  # a tiny base's one net serves every kind
        assert default_controlnet("tiny-sd15", kind, "sd15") == "tiny-canny"
        assert default_controlnet("tiny-sdxl", kind, "sdxl") == "tiny-sdxl-controlnet"
    assert default_controlnet("sd15", "canny", "sd15") == "lllyasviel/sd-controlnet-canny"
    for kind in ("depth", "plan-depth"):
        assert default_controlnet("sd15", kind, "sd15") == "lllyasviel/sd-controlnet-depth"
    assert default_controlnet("sdxl", "canny", "sdxl") == "diffusers/controlnet-canny-sdxl-1.0"
    assert default_controlnet(ALIASES["sdxl"], "plan-depth", "sdxl") == "diffusers/controlnet-depth-sdxl-1.0"
    # A real base's family is read from its own config by the worker that loads it.
    assert model_cache.family(resolve("tiny-sdxl", models_dir)) == "sdxl"
    assert model_cache.family(resolve("tiny-sd15", models_dir)) == "sd15"
    assert model_cache.family("sdxl") == "sdxl"  # known by name: nothing to read
    for base, kind in (("sd15", "scribble-in-crayon"), ("sdxl", "none"), ("sd15", "image")):
        with pytest.raises(ValueError, match="name a model"):
            default_controlnet(base, kind, "sd15")


def test_devices() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda", 0)) == torch.float16
    with pytest.raises(ConfigError):
        pick_device("tpu:9")


# --- model cache ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_loads_each_model_once(models_dir: Path) -> None:
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    two_units = [
        ControlInput("tiny-canny", PLAN_A, 1.0, 0.0, 1.0),
        ControlInput("tiny-canny", PLAN_B, 0.5, 0, 1),
    ]
    for controls in (None, None, two_units):
        run(cache, controls=controls, steps=1)
    assert cache.loads == Counter({resolve("tiny-sd15", models_dir): 1, resolve("tiny-canny", models_dir): 1})
    assert sum(cache.hits.values()) == 2 + 3


@pytest.mark.usefixtures("hub_offline")
def test_unloadable_models_raise_model_error(model_cache: ModelCache, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="missing-folder"):
        model_cache.base(str(tmp_path / "missing-folder"))
    with pytest.raises(ModelError, match="nobody/no-such-model"):
        model_cache.controlnet("nobody/no-such-model")
    with pytest.raises(ModelError, match="nobody/no-such-model"):
        model_cache.base("nobody/no-such-model")
    with pytest.raises(ModelError, match="tiny-sd15"):
        model_cache.controlnet("tiny-sd15")  # a folder, but of another kind of model
    with pytest.raises(ModelError, match="tiny-sd15"):
        model_cache.vae("tiny-sd15")  # a pipeline folder, not a VAE's
    with pytest.raises(ModelError, match="not a diffusers base model"):
        model_cache.base(resolve("tiny-canny", model_cache.models_dir))


def test_identity_is_stable_and_tells_models_apart(model_cache: ModelCache, models_dir: Path) -> None:
    base = model_cache.identity("tiny-sd15")
    fresh = ModelCache(models_dir, torch.device("cpu"), torch.float32).identity("tiny-sd15")
    assert base == fresh and len(base["sha256"]) == 64 and base["revision"] is None
    assert model_cache.identity("tiny-canny")["sha256"] != base["sha256"]
    assert model_cache.identity("sd15")["sha256"] is None  # a hub model: its commit, once it is cached


# --- renders ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_image_per_seed_at_the_requested_size(model_cache: ModelCache) -> None:
    result = run(model_cache, seeds=[1, 2, 3])
    assert [(image.size, image.mode) for image in result.images] == [((SIZE, SIZE), "RGB")] * 3
    assert result.scheduler["class"] == "PNDMScheduler"  # SD 1.5's own, kept by "default"
    assert json.loads(json.dumps(result.scheduler)) == result.scheduler


@pytest.mark.slow
def test_same_seed_is_bitwise_identical_and_seeds_differ(model_cache: ModelCache) -> None:
    first, second, other = (run(model_cache, seeds=[seed]).images[0] for seed in (7, 7, 8))
    assert np.array_equal(pixels(first), pixels(second))
    assert not np.array_equal(pixels(first), pixels(other))


@pytest.mark.slow
def test_control_image_matters_only_with_a_scale(model_cache: ModelCache) -> None:
    off_a = floats(model_cache, ControlInput("tiny-canny", PLAN_A, 0.0, 0.0, 1.0))
    off_b = floats(model_cache, ControlInput("tiny-canny", PLAN_B, 0.0, 0.0, 1.0))
    on_a = floats(model_cache, ControlInput("tiny-canny", PLAN_A, 1.0, 0.0, 1.0))
    on_b = floats(model_cache, ControlInput("tiny-canny", PLAN_B, 1.0, 0.0, 1.0))
    assert np.array_equal(off_a, off_b)
    assert np.abs(on_a - on_b).max() > 1e-5  # small for tiny random models, but real
    assert np.abs(on_a - off_a).max() > 0.05


def test_two_controlnets_apply_each_unit_with_its_own_settings(model_cache: ModelCache) -> None:
    single = floats(model_cache, ControlInput("tiny-canny", PLAN_A, 1.0, 0.0, 1.0))
    both = [
        ControlInput("tiny-canny", PLAN_A, 1.0, 0.0, 1.0),
        ControlInput("tiny-canny", PLAN_B, 0.0, 0.0, 1.0),
    ]
    second_off = run(model_cache, controls=both, output_type="np").images[0]
    assert np.allclose(second_off, single, atol=1e-6)
    both[1] = ControlInput("tiny-canny", PLAN_B, 0.8, 0.2, 0.7)
    second_on = run(model_cache, controls=both, output_type="np").images[0]
    assert second_on.shape == (SIZE, SIZE, 3) and np.abs(second_on - single).max() > 0.01


def test_batched_seeds_match_one_seed_renders(model_cache: ModelCache) -> None:
    batched = run(model_cache, seeds=[3, 5]).images
    alone = [run(model_cache, seeds=[seed]).images[0] for seed in (3, 5)]
    for together, single in zip(batched, alone, strict=True):
        assert np.abs(pixels(together) - pixels(single)).max() <= 1


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.slow
def test_every_scheduler_renders(model_cache: ModelCache, name: str) -> None:
    result = run(model_cache, scheduler=name, steps=2)
    assert len(result.images) == 1
    assert result.scheduler["config"]["beta_end"] == 0.012  # the base's noise schedule, whatever the class


@pytest.mark.slow
def test_on_step_reports_each_denoising_step(model_cache: ModelCache) -> None:
    calls: list[tuple[int, int]] = []
    run(model_cache, scheduler="ddim", on_step=lambda step, total: calls.append((step, total)))
    assert calls == [(step, STEPS) for step in range(1, STEPS + 1)]

    calls.clear()  # PNDM (SD 1.5's default) runs one extra timestep, reported within the steps asked for
    run(model_cache, on_step=lambda step, total: calls.append((step, total)))
    assert len(calls) == STEPS + 1 and {total for _, total in calls} == {STEPS}
    assert [step for step, _ in calls] == sorted(step for step, _ in calls) and calls[-1] == (STEPS, STEPS)


def test_control_map_of_the_wrong_size_is_refused(model_cache: ModelCache) -> None:
    with pytest.raises(InvalidInput, match="32×32"):
        run(model_cache, controls=[ControlInput("tiny-canny", PLAN_A.resize((32, 32)), 1.0, 0.0, 1.0)])


# --- ControlNets outside their guidance window ------------------------------------------------------------


@pytest.fixture
def canny_forwards(model_cache: ModelCache):
    """Counts forward calls of the session cache's tiny-canny for one test."""
    calls: list[int] = []
    handle = model_cache.controlnet("tiny-canny").register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize(
    "windows",
    [[(0.0, 0.5)], [(0.0, 0.5), (0.2, 1.0)]],
    ids=["one-net", "two-nets"],
)
@pytest.mark.slow
def test_skipping_nets_outside_their_window_changes_nothing_but_the_work(
    model_cache: ModelCache, canny_forwards: list[int], windows: list[tuple[float, float]]
) -> None:
    units = [("tiny-canny", PLAN_A, 1.0), ("tiny-canny", PLAN_B, 0.6)][: len(windows)]
    controls = [ControlInput(*unit, *window) for unit, window in zip(units, windows, strict=True)]
    # DDIM: exactly STEPS timesteps, so the windows cover whole steps: (0, .5) steps 0-1, (.2, 1) steps 1-3.
    outputs = {}
    forwards = {}
    for skip in (False, True):
        canny_forwards.clear()
        outputs[skip] = run(
            model_cache, controls=controls, scheduler="ddim", output_type="np", skip_outside_window=skip
        ).images[0]
        forwards[skip] = len(canny_forwards)
    assert np.array_equal(outputs[True], outputs[False])
    in_window = {1: 2, 2: 2 + 3}[len(windows)]
    assert forwards == {False: STEPS * len(windows), True: in_window}


@pytest.mark.slow
def test_every_net_skipped_renders_as_without_controlnet(model_cache: ModelCache, canny_forwards: list[int]) -> None:
    off = ControlInput("tiny-canny", PLAN_A, 0.0, 0.0, 1.0)  # scale 0: outside its window at every step
    skipped = run(model_cache, controls=[off], scheduler="ddim", output_type="np").images[0]
    assert canny_forwards == []
    computed = run(model_cache, controls=[off], scheduler="ddim", output_type="np", skip_outside_window=False)
    assert np.array_equal(skipped, computed.images[0]) and len(canny_forwards) == STEPS


@pytest.mark.slow
def test_each_unit_keeps_its_own_window(model_cache: ModelCache) -> None:
    def units(first: tuple[float, float], second: tuple[float, float]) -> list[ControlInput]:
        return [ControlInput("tiny-canny", PLAN_A, 1.0, *first), ControlInput("tiny-canny", PLAN_B, 0.5, *second)]

    one = run(model_cache, controls=units((0.0, 0.5), (0.2, 1.0)), output_type="np").images[0]
    swapped = run(model_cache, controls=units((0.2, 1.0), (0.0, 0.5)), output_type="np").images[0]
    assert np.abs(one - swapped).max() > 0.01


# --- running out of GPU memory ----------------------------------------------------------------------------


@pytest.fixture
def unet_batches(model_cache: ModelCache):
    """The UNet's batch sizes, as a stand-in for CUDA (not here) raising torch.OutOfMemoryError past a size
    set through `limit` (with classifier-free guidance the UNet batch is twice the number of seeds)."""
    seen: list[int] = []
    limit: dict[str, object] = {"batch": 1 << 30, "error": torch.OutOfMemoryError}

    def out_of_memory(_module: torch.nn.Module, args: tuple) -> None:
        seen.append(args[0].shape[0])
        if args[0].shape[0] > limit["batch"]:
            raise limit["error"](f"CUDA out of memory. Tried to allocate a batch of {args[0].shape[0]}")

    handle = model_cache.base("tiny-sd15")["unet"].register_forward_pre_hook(out_of_memory)
    yield seen, limit
    handle.remove()


@pytest.mark.slow
def test_out_of_memory_splits_the_batch_and_keeps_the_order(model_cache: ModelCache, unet_batches) -> None:
    seen, limit = unet_batches
    seeds = [3, 5, 7, 9]
    alone = [run(model_cache, seeds=[seed], scheduler="ddim").images[0] for seed in seeds]
    limit["batch"] = 2 * 2  # two seeds fit, four do not
    seen.clear()
    split = run(model_cache, seeds=seeds, scheduler="ddim").images
    assert seen == [8] + [4] * STEPS * 2  # the first step of four seeds failed; then two halves of two
    for image, single in zip(split, alone, strict=True):
        assert np.abs(pixels(image) - pixels(single)).max() <= 1


@pytest.mark.slow
def test_out_of_memory_while_a_cuda_graph_is_captured_splits_the_batch_too(
    model_cache: ModelCache, unet_batches
) -> None:
    """Under CUDA graphs an allocation that fails during capture surfaces as a capture error (pytorch#159594)."""
    seen, limit = unet_batches
    limit["batch"], limit["error"] = (
        2,
        lambda _: RuntimeError("CUDA error: operation failed due to a previous error during capture"),
    )
    images = run(model_cache, seeds=[3, 5], scheduler="ddim").images
    assert len(images) == 2 and seen[:2] == [4, 2]
    limit["error"] = lambda _: RuntimeError("mat1 and mat2 shapes cannot be multiplied")  # not memory: raised as is
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run(model_cache, seeds=[3, 5])


@pytest.mark.slow
def test_out_of_memory_with_one_seed_fails_clearly(model_cache: ModelCache, unet_batches) -> None:
    _, limit = unet_batches
    limit["batch"] = 0
    with pytest.raises(torch.OutOfMemoryError, match="rendering a single image"):
        run(model_cache, seeds=[1, 2, 3])


# --- torch.compile ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_render_matches_eager_and_compiles_once(models_dir: Path) -> None:
    # A cache of its own: the compiled wrappers it keeps do not leak into other tests.
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    options = CompileOptions(backend="aot_eager")  # inductor costs minutes on CPU (docs/performance.md)
    controls = [
        ControlInput("tiny-canny", PLAN_A, 1.0, 0.0, 0.5),
        ControlInput("tiny-canny", PLAN_B, 0.5, 0.2, 1.0),
    ]
    eager = run(cache, controls=controls, steps=2, output_type="np").images[0]
    compiled = run(cache, controls=controls, steps=2, output_type="np", compile=options).images[0]
    graphs = dynamo_counters["stats"]["unique_graphs"]
    again = run(cache, controls=controls, steps=2, output_type="np", compile=options).images[0]
    assert dynamo_counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    assert np.allclose(compiled, eager, atol=1e-4) and np.array_equal(again, compiled)
    unet = cache.base("tiny-sd15")["unet"]
    assert cache.compiled(unet, options) is cache.compiled(unet, CompileOptions(backend="aot_eager"))
    assert torch._dynamo.config.recompile_limit >= 64


@register_backend(name="replayed-graphs")
def _replayed_graphs(graph: torch.fx.GraphModule, _inputs: list[torch.Tensor], **_options: object):  # type: ignore[no-untyped-def]
    """A backend that hands out its outputs as CUDA graph replays do: the same tensors every call, overwritten
    by the next call (the hazard cudagraph trees document), so a caller keeping an output sees it change."""
    kept: list[torch.Tensor] = []

    def replay(*args: torch.Tensor) -> list[torch.Tensor]:
        outputs = graph(*args)
        if not kept:
            kept.extend(output.clone() for output in outputs)
        for static, fresh in zip(kept, outputs, strict=True):
            static.copy_(fresh)
        return list(kept)

    return replay


@pytest.mark.slow
@pytest.mark.parametrize("guidance, skip", [(1.0, True), (7.5, False)])
def test_compiled_outputs_kept_across_replays_stay_as_they_were(models_dir: Path, guidance: float, skip: bool) -> None:
    """Without guidance, PNDM keeps the UNet's raw outputs across steps; a stack that does not skip keeps one
    net's residuals while the next runs. With graph replays each call overwrites the previous outputs, so the
    compiled render must own copies to match the eager one."""
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    options = CompileOptions(backend="replayed-graphs")
    # One scale for both units: a scale is a constant of the graph, so both units then replay the same graph.
    controls = [ControlInput("tiny-canny", PLAN_A, 1.0, 0.0, 1.0), ControlInput("tiny-canny", PLAN_B, 1.0, 0.0, 1.0)]
    args = dict(controls=controls, steps=4, guidance_scale=guidance, scheduler="pndm", output_type="np")
    eager = run(cache, skip_outside_window=skip, **args).images[0]
    compiled = run(cache, skip_outside_window=skip, compile=options, **args).images[0]
    assert np.allclose(compiled, eager, atol=1e-4)


@pytest.mark.slow
def test_a_tail_replays_a_compiled_bucket_that_holds_it_instead_of_compiling_its_own(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    options = CompileOptions(backend="aot_eager")
    calls: list[int] = []
    halving = pipeline._halving_on_oom
    monkeypatch.setattr(
        pipeline, "_halving_on_oom", lambda run, items, device: calls.append(len(items)) or halving(run, items, device)
    )
    run(cache, seeds=[1, 2, 3], output_type="np", compile=options)
    (tail,) = run(cache, seeds=[5], output_type="np", compile=options).images
    assert calls == [4, 4]  # the tail of one image replays the bucket of 4 rather than compiling one of 1
    alone = run(cache, seeds=[5], output_type="np").images[0]
    assert np.abs(tail - alone).max() <= 1 / 255
    fresh = ModelCache(models_dir, torch.device("cpu"), torch.float32)  # another process: no bucket yet
    run(fresh, seeds=[5], output_type="np", compile=options)
    assert calls[-1] == 1


@pytest.mark.slow
def test_compiled_calls_are_padded_to_a_bucket_and_reuse_it(models_dir: Path) -> None:
    """Three images render as a batch of four (the fourth dropped), so a later call of four compiles nothing."""
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    options = CompileOptions(backend="aot_eager")
    eager = run(cache, seeds=[1, 2, 3], output_type="np").images
    three = run(cache, seeds=[1, 2, 3], output_type="np", compile=options).images
    graphs = dynamo_counters["stats"]["unique_graphs"]
    four = run(cache, seeds=[4, 5, 6, 7], output_type="np", compile=options).images
    assert dynamo_counters["stats"]["unique_graphs"] == graphs
    assert len(three) == 3 and len(four) == 4
    assert all(np.abs(a - b).max() <= 1 / 255 for a, b in zip(three, eager, strict=True))


def test_unknown_compile_backend_is_invalid_input(model_cache: ModelCache) -> None:
    with pytest.raises(InvalidInput, match="no-such-backend"):
        run(model_cache, compile=CompileOptions(backend="no-such-backend"))


@pytest.mark.slow
def test_out_of_memory_while_sdxl_decodes_leaves_the_vae_as_it_was(models_dir: Path) -> None:
    """diffusers' SDXL pipeline upcasts an fp16 VAE to float32 to decode and casts it back only after a decode
    that succeeded: an OOM in decode must not leave the shared VAE in float32 for the halves and later calls."""
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float16)
    vae = cache.base("tiny-sdxl")["vae"]
    real_decode, calls = vae.decode, []

    def decode(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(vae.dtype)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate the decoded batch")
        return real_decode(*args, **kwargs)

    vae.decode = decode
    try:
        images = tiny_render(cache, base="tiny-sdxl", net="tiny-sdxl-controlnet", seeds=[1, 2], steps=2).images
    finally:
        del vae.decode
    assert len(images) == 2 and vae.dtype == torch.float16
    assert calls == [torch.float32] * 3  # upcast for each decode, the failed one included
    later = tiny_render(cache, base="tiny-sdxl", net="tiny-sdxl-controlnet", steps=2).images
    assert len(later) == 1 and vae.dtype == torch.float16
