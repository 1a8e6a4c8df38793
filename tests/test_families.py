"""The transformer families: FLUX.1 with FLUX ControlNets, FLUX.1 Control (the map as input channels of the base)
and SD 3 with SD3 ControlNets, each built tiny from configs, rendered with the farm's guarantees."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.client import Farm
from shared.db.status import JobStatus
from shared.errors import InvalidInput, SubmitWarning
from shared.spec import JobSpec, Profile
from tests.models_fixture import PLAN_A, PLAN_B
from workers.engine.family import family
from workers.engine.footprint import stack_bytes
from workers.engine.models import ModelCache, module_bytes
from workers.engine.pipeline import Item, Request, Unit, render_batch
from workers.engine.presets import resolve

STACKS = {
    "tiny-flux": "tiny-flux-controlnet",
    "tiny-flux-control": "tiny-flux-control",
    "tiny-sd3": "tiny-sd3-controlnet",
}
GUIDANCE = {"tiny-flux": 3.5, "tiny-flux-control": 3.5, "tiny-sd3": 5.0}


def _request(base: str, units: list[Unit], items: list[Item], **changes: object) -> Request:
    """A 64² call of 4 steps at the family's guidance, images as float arrays."""
    settings = {"steps": 4, "guidance_scale": GUIDANCE.get(base, 7.5), "width": 64, "height": 64, **changes}
    return Request(base=base, units=units, items=items, output_type="np", **settings)  # type: ignore[arg-type]


def _render(cache: ModelCache, base: str, maps: list[tuple], seeds=(1,), scale: float = 1.0) -> list[np.ndarray]:  # type: ignore[no-untyped-def, type-arg]
    units = [Unit(STACKS[base], scale, 0.0, 1.0) for _ in maps[0]]
    items = [Item("a bright living room", "blurry", seed, item) for seed, item in zip(seeds, maps, strict=True)]
    return list(render_batch(cache, _request(base, units, items)).images)


@pytest.mark.parametrize("base", sorted(STACKS))
def test_each_family_is_steered_by_its_map_and_a_batch_matches_each_image_alone(
    model_cache: ModelCache, base: str
) -> None:
    """The control map changes the image; in one call of two items with different maps and seeds, each image is
    within 1/255 of its render alone; the same call twice is bitwise the same."""
    (a,) = _render(model_cache, base, [(PLAN_A,)])
    (b,) = _render(model_cache, base, [(PLAN_B,)])
    assert np.abs(a - b).max() > 1 / 255
    batch = _render(model_cache, base, [(PLAN_A,), (PLAN_B,)], seeds=(1, 2))
    (alone,) = _render(model_cache, base, [(PLAN_B,)], seeds=(2,))
    assert np.abs(batch[0] - a).max() <= 1 / 255 and np.abs(batch[1] - alone).max() <= 1 / 255
    assert np.array_equal(_render(model_cache, base, [(PLAN_B,)], seeds=(2,))[0], alone)


@pytest.mark.parametrize("base", ["tiny-flux", "tiny-sd3"])
def test_a_controlnets_scale_and_second_unit_change_flux_and_sd3_renders(model_cache: ModelCache, base: str) -> None:
    (full,) = _render(model_cache, base, [(PLAN_A,)])
    (none,) = _render(model_cache, base, [(PLAN_A,)], scale=0.0)
    (two,) = _render(model_cache, base, [(PLAN_A, PLAN_B)])
    assert np.abs(full - none).max() > 1 / 255 and np.abs(full - two).max() > 1 / 255


@pytest.mark.parametrize(
    ("base", "expected"), [("tiny-flux", "flux"), ("tiny-flux-control", "flux-control"), ("tiny-sd3", "sd3")]
)
def test_a_bases_family_is_read_from_its_config_whatever_its_folder_is_called(
    models_dir: Path, tmp_path: Path, base: str, expected: str
) -> None:
    renamed = tmp_path / "studio-model"
    shutil.copytree(resolve(base, models_dir), renamed)
    assert family(str(renamed)) == expected


@pytest.mark.parametrize("base", sorted(STACKS))
def test_a_transformer_stack_is_sized_from_its_configs_as_it_holds_once_loaded(models_dir: Path, base: str) -> None:
    """T5 and the transformer counted from their configs; a FLUX.1 Control base is counted once."""
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    nets = [] if STACKS[base] == base else [resolve(STACKS[base], models_dir)]
    estimate = stack_bytes(resolve(base, models_dir), nets, None, torch.float32)
    loaded = sum(module_bytes(m) for m in cache.base(base).values() if isinstance(m, torch.nn.Module))
    loaded += sum(module_bytes(cache.controlnet(STACKS[base])) for _ in nets)
    assert abs(estimate - loaded) / loaded < 0.001, (estimate, loaded)


def test_sd15_and_flux_stacks_swap_on_one_worker_within_its_controlnet_budget(models_dir: Path) -> None:
    """Renders alternating between an SD 1.5 and a FLUX stack with room for one ControlNet: each switch evicts
    the other family's net to the offload tier and brings it back from there, never from disk again."""
    sizing = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    small, large = sorted(module_bytes(sizing.controlnet(net)) for net in ("tiny-canny", "tiny-flux-controlnet"))
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32, controlnet_budget_bytes=large + small // 2)
    sd_request = _request(
        "tiny-sd15",
        [Unit("tiny-canny", 1.0, 0.0, 1.0)],
        [Item("a bright living room", "blurry", 1, (PLAN_A,))],
        steps=2,
    )
    first = render_batch(cache, sd_request).images[0]
    for _ in range(2):
        _render(cache, "tiny-flux", [(PLAN_A,)])
        again = render_batch(cache, sd_request).images[0]
    assert cache.swaps == 4 and np.array_equal(first, again)
    located = {name: cache.location(name) for name in ("tiny-canny", "tiny-flux-controlnet")}
    assert all(cache.loads[key] == 1 for key in located.values())
    assert cache.evictions[located["tiny-canny"]] == 2 and cache.restores[located["tiny-canny"]] == 2
    assert len(cache.resident()) - 2 == 1  # two bases, one ControlNet within the budget


def test_what_a_transformer_base_cannot_do_is_refused_at_submit() -> None:
    def profile(base: str, **changes: object) -> Profile:
        return Profile.model_validate(
            {"base": base, "controls": [{"kind": "canny"}], "width": 64, "height": 64, **changes}
        )

    assert profile("tiny-flux-control").controls[0].model is None
    with pytest.raises(ValueError, match="flux samples with its own flow-matching scheduler"):
        profile("tiny-flux", scheduler="euler")
    with pytest.raises(ValueError, match="sd3 renders sizes that are multiples of 16, not 72×64"):
        profile("tiny-sd3", width=72)
    with pytest.raises(ValueError, match="FLUX.1 Control model: it takes one control map"):
        profile("tiny-flux-control", controls=[{"kind": "canny"}, {"kind": "plan-depth"}])
    with pytest.raises(ValueError, match="FLUX.1 Control model: it takes one control map"):
        profile("tiny-flux-control", controls=[{"kind": "canny", "model": "tiny-flux-controlnet"}])
    with pytest.raises(ValueError, match="is a FLUX.1 Control model: its unit takes no scale or window"):
        profile("tiny-flux-control", controls=[{"kind": "canny", "scale": 0.5}])
    with pytest.raises(ValueError, match="ControlNet-Union is made for SDXL, not 'tiny-sd3'"):
        profile("tiny-sd3", union="tiny-sdxl-union")
    job = {"plans": ["plan.png"], "styles": ["modern"], "seeds": [1], "profile": "tiny-flux"}
    staged = {"draft": {"steps": 2}, "pick": {"by": "hand"}, "final": {"scale": 2}}
    with pytest.raises(InvalidInput, match="tiny-flux renders from noise only; stages and revisions"):
        JobSpec.from_document({**job, **staged})


def test_a_worker_refuses_a_controlnet_of_another_family_in_one_line(model_cache: ModelCache) -> None:
    request = _request(
        "tiny-flux", [Unit("tiny-sd3-controlnet", 1.0, 0.0, 1.0)], [Item("a room", "", 1, (PLAN_A,))], steps=2
    )
    with pytest.raises(InvalidInput, match="'tiny-sd3-controlnet' is a SD3ControlNetModel, not made for flux"):
        render_batch(model_cache, request)


def test_flux_and_sd35_licences_are_enforced_at_submit(tmp_path: Path, example_plan: Path) -> None:
    from producer.submit import prepare
    from shared.config import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", storage_url=str(tmp_path / "out"))
    job = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [1]}
    with pytest.raises(InvalidInput, match="profile.base: black-forest-labs/FLUX.1-dev is under the FLUX.1 .dev. Non"):
        prepare(JobSpec.from_document({**job, "profile": "flux-archviz"}), settings, farm=True)
    allowed = prepare(
        JobSpec.from_document({**job, "profile": "flux-archviz", "use": "non-commercial"}), settings, farm=True
    )
    assert allowed.spec.use == "non-commercial"
    with pytest.warns(
        SubmitWarning, match="3.5-large-controlnet-canny is under the Stability AI Community License: free"
    ):
        prepare(JobSpec.from_document({**job, "profile": "sd35-archviz"}), settings, farm=True)


@pytest.mark.parametrize("base", ["tiny-flux", "tiny-sd3"])
def test_a_net_outside_its_window_is_skipped_and_the_image_is_bitwise_diffusers(
    model_cache: ModelCache, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit 2 steers the first half of the steps only: skipping it outside its window runs it half as often and
    gives the same floats as diffusers' own stack, which runs it at scale 0 there."""
    net = model_cache.controlnet(STACKS[base])
    calls = []
    monkeypatch.setattr(type(net), "forward", _counted(type(net).forward, calls))
    units = [Unit(STACKS[base], 0.8, 0.0, 1.0), Unit(STACKS[base], 0.6, 0.0, 0.5)]
    images = {}
    for skip in (True, False):
        calls.clear()
        request = _request(
            base, units, [Item("a bright living room", "blurry", 1, (PLAN_A, PLAN_B))], skip_outside_window=skip
        )
        images[skip] = render_batch(model_cache, request).images[0]
        images[skip, "calls"] = len(calls)
    assert np.array_equal(images[True], images[False])
    assert (images[True, "calls"], images[False, "calls"]) == (6, 8)


def _counted(forward, calls: list[int]):  # type: ignore[no-untyped-def]
    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return forward(*args, **kwargs)

    return counted


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny-flux", "tiny-sd3"])  # FLUX.1 Control compiles the same transformer path
def test_each_family_renders_compiled_within_1_255_of_eager(models_dir: Path, base: str) -> None:
    """The transformer and its ControlNets compiled (aot_eager: the graphs without generated code), two seeds in
    one call; a later call of one seed replays the bucket it padded to."""
    from workers.engine.compile import CompileOptions

    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    eager = _render(cache, base, [(PLAN_A,), (PLAN_B,)], seeds=(1, 2))
    options = CompileOptions(mode="default", backend="aot_eager")
    units = [Unit(STACKS[base], 1.0, 0.0, 1.0)]
    request = _request(
        base,
        units,
        [Item("a bright living room", "blurry", seed, (plan,)) for seed, plan in ((1, PLAN_A), (2, PLAN_B))],
        compile=options,
    )
    from torch._dynamo.utils import counters

    compiled = render_batch(cache, request).images
    graphs = counters["stats"]["unique_graphs"]
    tail = render_batch(cache, replace(request, items=request.items[1:])).images
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph: the tail replays the bucket of two
    assert all(np.abs(a - b).max() <= 1 / 255 for a, b in zip(eager, compiled, strict=True))
    assert np.abs(tail[0] - eager[1]).max() <= 1 / 255


def test_text_encoders_held_in_cpu_memory_leave_the_device_stack_and_the_image_as_they_were(
    models_dir: Path, model_cache: ModelCache
) -> None:
    """`text_encoders: cpu`: the stack a worker must hold on its device loses the text encoders (FLUX's T5 and
    CLIP here), the image is the same (bitwise on a CPU) and so is the profile's digest (its output keys)."""
    base = resolve("tiny-flux", models_dir)
    nets = [resolve("tiny-flux-controlnet", models_dir)]
    whole = stack_bytes(base, nets, None, torch.float32)
    lean = stack_bytes(base, nets, None, torch.float32, text_encoders="cpu")
    components = model_cache.base("tiny-flux", "cpu")
    encoders = sum(module_bytes(components[name]) for name in ("text_encoder", "text_encoder_2"))
    assert whole - lean == pytest.approx(encoders, rel=0.01)  # buffers such as position ids are counted at dtype
    request = _request(
        "tiny-flux",
        [Unit("tiny-flux-controlnet", 1.0, 0.0, 1.0)],
        [Item("a bright living room", "", 1, (PLAN_A,))],
        steps=3,
    )
    on_device = render_batch(model_cache, request).images[0]
    on_cpu = render_batch(model_cache, replace(request, text_encoders="cpu")).images[0]
    assert np.array_equal(on_device, on_cpu)
    profile = {"base": "tiny-flux", "controls": [{"kind": "canny"}], "width": 64, "height": 64}
    lean_profile = Profile.model_validate({**profile, "text_encoders": "cpu"})
    assert lean_profile.digest() == Profile.model_validate(profile).digest()


@pytest.mark.parametrize(("base", "adapter"), [("tiny-sd15", "tiny-sd15-adapter"), ("tiny-sdxl", "tiny-sdxl-adapter")])
def test_t2i_adapters_steer_sd15_and_sdxl_once_per_image_and_batch_like_each_image_alone(
    model_cache: ModelCache, base: str, adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two adapters on two maps: scale 0 differs from scale 1, each image of a batch is within 1/255 of its
    render alone, and each adapter runs once per call whatever the number of steps."""
    net = model_cache.controlnet(adapter)
    calls: list[int] = []
    monkeypatch.setattr(type(net), "forward", _counted(type(net).forward, calls))

    def render(items: list[Item], scale: float = 1.0) -> list[np.ndarray]:
        request = _request(base, [Unit(adapter, scale, 0.0, 1.0), Unit(adapter, scale, 0.0, 1.0)], items, adapters=True)
        return list(render_batch(model_cache, request).images)

    items = [
        Item("a bright living room", "blurry", 1, (PLAN_A, PLAN_B)),
        Item("a bright room", "", 2, (PLAN_B, PLAN_A)),
    ]
    batch = render(items)
    assert len(calls) == 2  # two adapters, once each for the whole call
    (alone,) = render(items[1:])
    (off,) = render(items[:1], scale=0.0)
    assert np.abs(batch[1] - alone).max() <= 1 / 255 and np.abs(batch[0] - off).max() > 1 / 255


def test_t2i_adapter_profiles_are_checked_at_submit() -> None:
    def profile(**changes: object) -> Profile:
        base = {"base": "tiny-sdxl", "adapters": True, "controls": [{"kind": "canny"}], "width": 64, "height": 64}
        return Profile.model_validate({**base, **changes})

    assert (
        profile().digest()
        != profile(adapters=False).digest()
        == Profile.model_validate(
            {"base": "tiny-sdxl", "controls": [{"kind": "canny"}], "width": 64, "height": 64}
        ).digest()
    )
    assert profile(controls=[{"kind": "canny", "end": 0.5}, {"kind": "plan-depth", "end": 0.5}]).adapters
    with pytest.raises(ValueError, match="T2I-Adapters start at 0 and end together"):
        profile(controls=[{"kind": "canny", "end": 0.5}, {"kind": "plan-depth"}])
    with pytest.raises(ValueError, match="SD 1.5's adapter pipeline runs its T2I-Adapters to the end"):
        profile(base="tiny-sd15", controls=[{"kind": "canny", "end": 0.5}])
    with pytest.raises(ValueError, match="T2I-Adapters are made for SD 1.5 and SDXL, not 'tiny-flux'"):
        profile(base="tiny-flux")
    with pytest.raises(ValueError, match="T2I-Adapters or a ControlNet-Union, not both"):
        profile(union="tiny-sdxl-union")
    job = {"plans": ["plan.png"], "styles": ["modern"], "seeds": [1], "profile": "tiny-adapters"}
    with pytest.raises(InvalidInput, match="a T2I-Adapter profile renders from noise only"):
        JobSpec.from_document({**job, "draft": {"steps": 2}, "pick": {"by": "hand"}, "final": {"scale": 2}})


def test_an_int8_base_halves_the_denoisers_memory_is_sized_before_it_loads_and_still_follows_its_map(
    models_dir: Path, model_cache: ModelCache
) -> None:
    """`quantize_base: int8`: FLUX's transformer loaded int8 weight-only; the stack's size known beforehand
    within 3% of what it holds (over, never under); the image stays close to the float one and the map
    still steers it; the profile's digest changes (its images differ)."""
    base = resolve("tiny-flux", models_dir)
    whole = stack_bytes(base, [], None, torch.float32)
    estimate = stack_bytes(base, [], None, torch.float32, quantize_base="int8")
    loaded = sum(
        module_bytes(m)
        for m in model_cache.base("tiny-flux", quantize="int8").values()
        if isinstance(m, torch.nn.Module)
    )
    assert abs(estimate - loaded) / loaded < 0.01 and estimate < whole

    def render(plan, quantize_base):  # type: ignore[no-untyped-def]
        request = _request(
            "tiny-flux",
            [Unit("tiny-flux-controlnet", 1.0, 0.0, 1.0)],
            [Item("a bright living room", "", 1, (plan,))],
            steps=3,
            quantize_base=quantize_base,
        )
        return render_batch(model_cache, request).images[0]

    full, int8 = render(PLAN_A, None), render(PLAN_A, "int8")
    steered = np.abs(render(PLAN_B, "int8") - int8).max()
    assert 0 < np.abs(full - int8).mean() < 0.05 and steered > 1 / 255
    profile = {"base": "tiny-flux", "controls": [{"kind": "canny"}], "width": 64, "height": 64}
    assert (
        Profile.model_validate({**profile, "quantize_base": "int8"}).digest()
        != Profile.model_validate(profile).digest()
    )


JOBS = {
    "tiny-flux": ["tiny-flux-controlnet"] * 2,
    "tiny-flux-control": ["tiny-flux-control"],
    "tiny-sd3": ["tiny-sd3-controlnet"] * 2,
    "tiny-adapters": ["tiny-sd15-adapter"] * 2,
    "tiny-sdxl-union": ["tiny-sdxl-union"] * 2,
}
"""Each family's tiny profile, and the networks its sidecars name per unit."""


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.s3
@pytest.mark.slow
def test_every_family_renders_a_job_on_one_real_worker_within_its_budget_and_rerenders_bitwise(
    farm: Farm,
    farm_env: dict[str, str],
    start_workers,
    example_plan: Path,
    models_dir: Path,
    tmp_path: Path,
    s3_server,
    s3_bucket: str,
) -> None:
    """A 2 plans × 2 styles × 2 seeds job of each family (FLUX, FLUX Control, SD 3, SD 1.5 T2I-Adapters, SDXL
    Union) queued together on one worker whose ControlNet budget holds one tiny net: every job succeeds, the
    worker swaps stacks between them and reads each model from disk once (the others' nets wait in the offload
    tier); each job's sidecar names its networks and their licence, and one of its images re-renders bitwise."""
    from PIL import Image

    from producer.rerender import rerender
    from shared.profiles import BUILTIN

    sizing = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    nets = {net for nets in JOBS.values() for net in nets} - {"tiny-flux-control"}  # that one is a base
    sizes = sorted(module_bytes(sizing.controlnet(net)) for net in nets)
    farm_env["ARCHFARM_CONTROLNET_CACHE_BYTES"] = str(sizes[-1] + sizes[0] // 2)  # the largest, not two
    second = tmp_path / "second.png"
    Image.open(example_plan).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
    start_workers("cpu:1")
    job = {"plans": [str(example_plan), str(second)], "styles": ["modern", "japandi"], "seeds": [1, 2]}
    ids = {
        name: farm.submit({**job, "profile": {**BUILTIN[name], "width": 64, "height": 64, "steps": 4}}) for name in JOBS
    }
    for name, job_id in ids.items():
        assert farm.wait(job_id, timeout=300).status is JobStatus.SUCCEEDED, name
        images = farm.results(job_id)
        assert len(images) == 8
        local = tmp_path / name
        local.mkdir()
        for url in (images[0].url, images[0].sidecar_url):
            key = url.split(f"{s3_bucket}/", 1)[1]
            body = s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            local.joinpath(url.rsplit("/", 1)[1]).write_bytes(body)
        sidecar_path = local / images[0].sidecar_url.rsplit("/", 1)[1]
        models = json.loads(sidecar_path.read_text())["models"]
        assert models["base"]["name"] == BUILTIN[name]["base"] and models["base"]["licence"] == "Apache-2.0"
        assert [net["name"] for net in models["controlnets"]] == JOBS[name], name
        assert all(net["licence"] == "Apache-2.0" for net in models["controlnets"])
        again = rerender(sidecar_path, tmp_path / f"{name}-again", farm.settings)
        assert again.comparison.identical, (name, again.verdict)
    (worker,) = [w for w in farm.workers() if w.state == "live"]
    bases = {BUILTIN[name]["base"] for name in JOBS}
    assert worker.stack_swaps >= len(JOBS) - 1 and worker.model_loads == len(bases) + len(nets)
