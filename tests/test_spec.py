"""Job spec validation: every bad value is refused with the field and the value named."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from shared.errors import InvalidInput
from shared.spec import ControlUnit, JobSpec, Profile, SeedRange, Style, load_job, load_profile, parse_model

CANNY = {"kind": "canny", "scale": 0.9, "start": 0.0, "end": 0.5}


def job(**changes: object) -> dict:
    base: dict = {
        "name": "villa-overnight",
        "priority": 50,
        "plans": ["plans/ground.png"],
        "styles": ["modern", "scandinavian"],
        "seeds": {"count": 4, "start": 0},
        "profile": {"base": "tiny-sd15", "controls": [CANNY], "steps": 20, "width": 512, "height": 512},
    }
    base.update(changes)
    return base


def profile(**changes: object) -> dict:
    return {**job()["profile"], **changes}


def error_of(data: dict) -> str:
    with pytest.raises(InvalidInput) as caught:
        parse_model(JobSpec, data)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_issue_example_is_valid_and_resolves_styles() -> None:
    spec = parse_model(
        JobSpec,
        job(styles=["modern", "scandinavian", {"name": "brutalist", "prompt": "raw concrete", "negative_prompt": "x"}]),
    )
    assert [s.name for s in spec.resolved_styles] == ["modern", "scandinavian", "brutalist"]
    assert spec.resolved_styles[2].prompt == "raw concrete"
    assert "scandinavian" in spec.resolved_styles[1].prompt
    assert spec.seed_values() == [0, 1, 2, 3]
    assert isinstance(spec.seeds, SeedRange)


def test_buildable_in_python_and_round_trips_through_json() -> None:
    spec = JobSpec(
        plans=["a.png"],
        styles=[Style(name="x", prompt="p")],
        seeds=[1, 7, 42],
        profile=Profile(controls=[{"kind": "canny"}]),
    )
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.seed_values() == [1, 7, 42]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"styles": ["modern", "baroque"]}, "styles: unknown style 'baroque'"),
        ({"styles": ["modern", "modern"]}, "duplicate style 'modern'"),
        ({"styles": []}, "styles: List should have at least 1 item"),
        ({"plans": []}, "plans: List should have at least 1 item"),
        ({"plans": ["http://example.com/a.png"]}, "unsupported URL scheme"),
        ({"seeds": [1, 2, 1]}, "seeds: duplicate seed 1"),
        ({"seeds": []}, "seeds: no seeds"),
        ({"seeds": [-1]}, "greater than or equal to 0"),
        ({"name": "../etc"}, "name: should be 1-64 letters, digits"),
        ({"name": "a/b"}, "name: should be 1-64 letters, digits"),
        ({"priority": 101}, "priority: should be less than or equal to 100"),
        ({"surprise": 1}, "surprise: unknown field"),
        ({"profile": profile(steps=0)}, "profile.steps: should be greater than or equal to 1 (got 0)"),
        ({"profile": profile(steps=151)}, "profile.steps: should be less than or equal to 150 (got 151)"),
        ({"profile": profile(width=500)}, "profile.width: 500 is not a multiple of 8"),
        ({"profile": profile(height=4096)}, "profile.height: should be less than or equal to 2048"),
        ({"profile": profile(controls=[])}, "profile.controls: List should have at least 1 item"),
        ({"profile": profile(controls=[{"kind": "pose"}])}, "profile.controls.0: unknown kind 'pose'; one of 'canny'"),
        ({"profile": profile(controls=[{**CANNY, "scale": 2.5}])}, "profile.controls.0.scale: should be less"),
        ({"profile": profile(controls=[{**CANNY, "start": 0.6}])}, "start (0.6) must be below end (0.5)"),
        ({"profile": profile(controls=[{**CANNY, "blur": 4}])}, "blur must be 0 or odd"),
        ({"profile": profile(base="not a model")}, "profile.base: 'not a model' names no model: give a folder"),
        ({"profile": profile(scheduler="magic")}, "profile.scheduler"),
        ({"profile": "nonesuch"}, "unknown profile 'nonesuch'"),
        ({"styles": [{"name": "x y", "prompt": "p"}]}, "styles.0"),
    ],
)
def test_bad_values_name_the_field(changes: dict, expected: str) -> None:
    assert expected in error_of(job(**changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seeds": "x"}, "seeds: should be a mapping or a valid list (got 'x')"),
        ({"seeds": {"count": 0}}, "seeds.count: should be greater than or equal to 1 (got 0)"),
        ({"profile": profile(batch=0)}, "profile.batch: should be greater than or equal to 1 (got 0)"),
        ({"profile": profile(compile="x")}, "profile.compile: should be 'auto' or a valid boolean"),
    ],
)
def test_messages_speak_archfarms_words_not_pydantics(changes: dict, message: str) -> None:
    """A union's alternatives are said once, in the user's terms: no class names, no union members, no `Input`."""
    error = error_of(job(**changes))
    assert error.startswith(message) and "; " not in error.removeprefix(message)
    assert not any(word in error for word in ("SeedRange", "literal[", "Input ", "instance of", ".bool"))


def test_job_size_is_capped() -> None:
    assert "over the limit" in error_of(job(plans=[f"p{i}.png" for i in range(1000)], seeds={"count": 1000}))


def test_kinds_without_a_default_controlnet_need_a_model() -> None:
    message = error_of(job(profile=profile(base="sd15", controls=[{"kind": "none"}])))
    assert "profile: controls.0.model:" in message and "'none'" in message
    named = profile(base="sd15", controls=[{"kind": "none", "model": "lllyasviel/sd-controlnet-seg"}])
    assert parse_model(JobSpec, job(profile=named)).profile.controls[0].model == "lllyasviel/sd-controlnet-seg"


def test_the_seed_documents_stacks_are_expressible(tmp_path: Path) -> None:
    pose = tmp_path / "pose.png"
    three = profile(
        base="sd15",
        controls=[
            {"kind": "image", "image": str(pose), "model": "lllyasviel/sd-controlnet-openpose", "scale": 1.2},
            {"kind": "depth", "scale": 0.7},
            {"kind": "canny", "scale": 0.4},
        ],
    )
    assert [u.scale for u in parse_model(JobSpec, job(profile=three)).profile.controls] == [1.2, 0.7, 0.4]
    windows = profile(
        controls=[
            {"kind": "image", "image": str(pose), "scale": 1.0, "start": 0.0, "end": 0.5},
            {"kind": "canny", "scale": 0.8, "start": 0.2, "end": 1.0},
        ]
    )
    units = parse_model(JobSpec, job(profile=windows)).profile.controls
    assert [(u.start, u.end) for u in units] == [(0.0, 0.5), (0.2, 1.0)]
    archviz = profile(controls=[{"kind": "canny", "scale": 0.9}, {"kind": "plan-depth", "scale": 0.6}])
    assert [u.kind for u in parse_model(JobSpec, job(profile=archviz)).profile.controls] == ["canny", "plan-depth"]


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ({"kind": "depth", "resolution": 16}, "resolution: should be greater than or equal to 32"),
        ({"kind": "depth", "depth_model": "no such"}, "names no model"),
        ({"kind": "plan-depth", "wall_px": 0}, "wall_px: should be greater than or equal to 1"),
        ({"kind": "image"}, "image: required"),
        ({"kind": "image", "image": "ftp://x/y.png"}, "unsupported URL scheme"),
        (
            {"kind": "canny", "model": "no/such/folder"},
            "names no model: give a folder (absolute, or relative as ./runs/x)",
        ),
    ],
)
def test_bad_control_units(unit: dict, expected: str) -> None:
    assert expected in error_of(job(profile=profile(controls=[unit])))


def test_validation_looks_at_no_disk() -> None:
    """A folder is checked where the job renders (submit, `producer.models`), never while parsing: a worker
    re-reading a stored spec must not fail on its own disk."""
    for ref in ("/models/mine", "./models/mine", "~/models/mine", "../models/mine"):
        assert parse_model(JobSpec, job(profile=profile(base=ref))).profile.base == ref


def test_compile_quantize_and_vae_settings() -> None:
    spec = parse_model(
        JobSpec, job(profile=profile(compile=True, compile_backend="aot_eager", quantize="int8", vae="sdxl"))
    )
    assert (spec.profile.compile, spec.profile.compile_backend, spec.profile.quantize) == (True, "aot_eager", "int8")
    assert "compile_mode" in error_of(job(profile=profile(compile_mode="fastest")))


def test_profile_digest_changes_with_any_setting() -> None:
    a = Profile.model_validate(profile())
    assert a.digest() == Profile.model_validate(profile()).digest()
    assert a.digest() != Profile.model_validate(profile(steps=21)).digest()


def test_load_job_resolves_plans_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: v\nplans: [plans/a.png, s3://b/k.png]\nstyles: [modern]\nseeds: [3]\nprofile: tiny\n")
    spec = load_job(path)
    assert spec.plans == [str(tmp_path / "plans/a.png"), "s3://b/k.png"]
    assert spec.profile.base == "tiny-sd15"


def test_unreadable_job_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(InvalidInput, match=r"job.yaml: line 2, column 1: expected ',' or '\]', but got '<stream end>'"):
        load_job(path)
    with pytest.raises(InvalidInput, match="no such file"):
        load_job(tmp_path / "missing.yaml")


def test_profile_from_name_or_yaml(tmp_path: Path) -> None:
    assert load_profile("tiny").base == "tiny-sd15"
    path = tmp_path / "p.yaml"
    path.write_text("profile:\n  base: tiny-sd15\n  width: 64\n  height: 64\n  controls: [{kind: canny, scale: 0.8}]\n")
    loaded = load_profile(str(path))
    assert (loaded.width, loaded.controls[0].scale) == (64, 0.8)
    with pytest.raises(InvalidInput, match="neither a built-in profile"):
        load_profile("nope")


def test_a_job_of_pool_default_goes_to_the_default_pools_queue() -> None:
    """`pool: default` is the pool of jobs that name none, where workers started without `--pool` listen."""
    from shared.config import Settings

    settings = Settings(queue="farm")
    assert settings.queue_for("default") == settings.queue_for(None) == "farm"
    assert settings.queue_for("big") == "farm.big"


@pytest.mark.parametrize("unit", typing.get_args(typing.get_args(ControlUnit)[0]), ids=lambda unit: unit.__name__)
def test_every_control_unit_field_says_what_it_is_about(unit: type) -> None:
    """A control map is cached by the unit's `MAP` fields (and its `SOURCE`): a field added to a unit without
    saying whether it steers the render, names the map's input or changes the map fails here, rather than
    silently sharing (or never sharing) maps that differ."""
    groups = (unit.STACK, unit.SOURCE, unit.MAP)
    assert set(unit.model_fields) == set().union(*groups)
    assert sum(len(group) for group in groups) == len(unit.model_fields)  # each in exactly one


def test_map_parameters_are_the_preprocessors_settings_only() -> None:
    canny = Profile.model_validate({"controls": [{"kind": "canny", "scale": 0.4, "sigma": 0.2}]}).controls[0]
    assert canny.map_parameters() == {"blur": 5, "sigma": 0.2}  # not the scale, window or model
