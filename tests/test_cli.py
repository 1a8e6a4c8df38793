"""`archfarm render` end to end: the README command, a job file, and bad input refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, func, select
from typer.testing import CliRunner

from producer.cli import app
from shared.db.models import Job, Task, TaskStatus

FAST_PROFILE = "profile:\n  base: tiny-sd15\n  width: 64\n  height: 64\n  steps: 3\n  controls: [{kind: canny}]\n"


@pytest.fixture
def env(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A user's working folder: nothing configured but the model cache the test session built."""
    monkeypatch.chdir(tmp_path)
    values = {"ARCHFARM_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1"}
    for key in [k for k in os.environ if k.startswith("ARCHFARM_")]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


def jobs_in(db: Path) -> int:
    if not db.exists():
        return 0
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as connection:
        count = connection.scalar(select(func.count()).select_from(Job))
    engine.dispose()
    return int(count or 0)


@pytest.mark.slow
def test_readme_command_renders_two_styles_two_seeds(env: dict[str, str], tmp_path: Path, example_plan: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "render",
            str(example_plan),
            "--style",
            "modern",
            "--style",
            "scandinavian",
            "--seeds",
            "2",
            "--profile",
            "tiny",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 4
    assert {p.parent.name for p in pngs} == {"modern", "scandinavian"}
    for png in pngs:
        assert Image.open(png).size == (128, 128)
        meta = json.loads(png.with_suffix(".json").read_text())
        assert meta["plan"]["name"] == "floorplan"
        assert len(meta["plan"]["sha256"]) == 64
        assert meta["style"]["name"] == png.parent.name and meta["style"]["prompt"]
        assert "negative_prompt" in meta["style"]
        assert meta["seed"] in (0, 1) and f"seed-{meta['seed']}_" in png.name
        assert meta["profile"]["steps"] == 8 and meta["profile"]["controls"][0]["kind"] == "plan-depth"
        assert meta["models"]["base"]["name"] == "tiny-sd15"
        assert meta["scheduler"]["class"]
        assert {"torch", "diffusers", "transformers"} <= set(meta["versions"])
        assert meta["timings"]["render_s"] > 0
    # Plain progress lines when not on a terminal, then a summary.
    assert "[4/4]" in result.stdout and "4 images" in result.stdout
    engine = create_engine(f"sqlite:///{tmp_path / 'archfarm.db'}")
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Task).where(Task.status == TaskStatus.SUCCEEDED)) == 4
    engine.dispose()


@pytest.mark.slow
def test_job_file_renders_the_same_way(env: dict[str, str], tmp_path: Path, example_plan: Path) -> None:
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "ground.png").write_bytes(example_plan.read_bytes())
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: villa\nplans: [plans/ground.png]\nstyles: [industrial, {name: mine, prompt: a loft}]\n"
        "seeds: [7]\noutput: results\n" + FAST_PROFILE
    )
    result = CliRunner().invoke(app, ["render", "--job", str(job), "--out", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    assert sorted(p.parent.name for p in (tmp_path / "results").rglob("*.png")) == ["industrial", "mine"]


def bomb(path: Path) -> None:
    Image.new("1", (12000, 12000)).save(path)


@pytest.mark.parametrize(
    ("plan", "setup", "args", "expected"),
    [
        ("empty.png", lambda p: p.write_bytes(b""), [], "empty.png: not an image (empty file)"),
        ("notes.png", lambda p: p.write_text("not a plan"), [], "notes.png: not an image"),
        ("cut.png", lambda p: p.write_bytes(Path(p.parent / "good.png").read_bytes()[:900]), [], "cut.png: truncated"),
        ("bomb.png", bomb, [], "bomb.png: 12000×12000 pixels is over the limit"),
        ("missing.png", None, [], "missing.png: no such file"),
        ("good.png", None, ["--style", "baroque"], "unknown style 'baroque'"),
        ("good.png", None, ["--profile", "bad.yaml"], "bad.yaml: steps: should be greater than or equal to 1"),
        ("good.png", None, ["--profile", "nonesuch"], "neither a built-in profile"),
        ("good.png", None, ["--seed", "1", "--seeds", "2"], "give either --seeds N or one or more --seed S"),
        ("loop.png", lambda p: p.symlink_to(p), [], "loop.png' cannot be resolved: Symlink loop"),
        ("good.png", None, ["--profile", "deep.yaml"], "deep.yaml: nested deeper than 32 levels"),
        ("good.png", None, ["--profile", "aliases.yaml"], "aliases.yaml: more than 2500000 values"),
        ("good.png", None, ["--profile", "dup.yaml"], "dup.yaml: line 3, column 1: duplicate key 'steps'"),
        (
            "good.png",
            None,
            ["--profile", "broken.yaml"],
            "broken.yaml: line 3, column 1: expected ',' or ']', but got '<scalar>' (while parsing a flow sequence "
            "at line 2, column 11)",
        ),
    ],
)
def test_bad_input_exits_with_one_line_and_stores_nothing(
    env: dict[str, str],
    tmp_path: Path,
    example_plan: Path,
    monkeypatch: pytest.MonkeyPatch,
    plan: str,
    setup: object,
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.setenv("ARCHFARM_MAX_IMAGE_PIXELS", "100000000")
    (tmp_path / "good.png").write_bytes(example_plan.read_bytes())
    (tmp_path / "bad.yaml").write_text("steps: 0\ncontrols: [{kind: canny}]\n")
    (tmp_path / "dup.yaml").write_text("steps: 3\ncontrols: [{kind: canny}]\nsteps: 4\n")
    (tmp_path / "broken.yaml").write_text("steps: 3\ncontrols: [{kind: canny}, {kind: depth}\nwidth: 64\n")
    (tmp_path / "deep.yaml").write_text("steps: " + "[" * 1000 + "]" * 1000 + "\n")  # blew Python's stack
    # A few hundred bytes that stand for ten billion values: walking them would never end.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp_path / "aliases.yaml").write_text("\n".join(lines) + "\ncontrols: *a9\n")
    if callable(setup):
        setup(tmp_path / plan)
    if "--style" not in args:
        args = [*args, "--style", "modern"]
    if "--seed" not in args:
        args = [*args, "--seeds", "1"]
    result = CliRunner().invoke(app, ["render", plan, *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archfarm: error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert jobs_in(tmp_path / "archfarm.db") == 0
    assert not (tmp_path / "out").exists()


def test_a_failed_render_is_reported_and_exits_non_zero(
    env: dict[str, str], tmp_path: Path, example_plan: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan changes between submit and render: the task fails with its reason, the command says so."""
    plan = tmp_path / "plan.png"
    plan.write_bytes(example_plan.read_bytes())
    from producer import local

    real_prepare = local.prepare

    def prepare_then_edit(spec, settings):  # type: ignore[no-untyped-def]
        job = real_prepare(spec, settings)
        Image.new("RGB", (64, 64), "white").save(plan)
        return job

    monkeypatch.setattr(local, "prepare", prepare_then_edit)
    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    result = CliRunner().invoke(
        app, ["render", str(plan), "--style", "modern", "--seeds", "1", "--profile", str(profile)]
    )
    assert result.exit_code == 1
    assert f"plan 'plan' ({(tmp_path / 'plan.png').as_uri()}): changed after the job was submitted" in result.stderr
    assert "1 of 1 tasks failed" in result.stderr
    assert ": 0 of 1 images in " in result.stdout  # nothing written, and it says so


def test_rerender_reproduces_the_image_bitwise(env: dict[str, str], tmp_path: Path, example_plan: Path) -> None:
    """Rendered on one thread (as a farm worker sharing its cores), re-rendered here on the default count:
    bitwise the same, under the same key, and only the image asked for (its task rendered two seeds)."""
    profile = tmp_path / "batch.yaml"
    # 128²: at 64² the two thread counts happen to round to the same pixels.
    fast = FAST_PROFILE.replace("width: 64\n  height: 64", "width: 128\n  height: 128")
    profile.write_text(fast.replace("steps: 3", "steps: 3\n  seeds_per_task: 2"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = CliRunner().invoke(
            app,
            [
                "render",
                str(example_plan),
                "--style",
                "modern",
                "--seeds",
                "2",
                "--profile",
                str(profile),
                "--out",
                str(tmp_path / "a"),
            ],
        )
    finally:
        torch.set_num_threads(threads)
    assert first.exit_code == 0, first.output
    original = sorted((tmp_path / "a").rglob("seed-1_*.png"))[0]
    assert json.loads(original.with_suffix(".json").read_text())["threads"] == 1
    again = CliRunner().invoke(app, ["rerender", str(original.with_suffix(".json")), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    where, verdict = again.stdout.strip().splitlines()
    copy = Path(where)
    assert copy.relative_to(tmp_path / "b") == original.relative_to(tmp_path / "a")
    assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(original)))
    assert verdict == "identical to the original, bit for bit"
    assert sorted(p.name for p in (tmp_path / "b").rglob("*.*")) == [original.with_suffix(".json").name, original.name]
    assert "warning" not in again.stderr
    # Its sidecar describes the new image and where it came from, not the scratch job that rendered it.
    fresh, before = (json.loads(p.with_suffix(".json").read_text()) for p in (copy, original))
    assert (fresh["plan"], fresh["job"], fresh["task"]) == (before["plan"], before["job"], before["task"])
    assert fresh["rerender"] == {
        "of": str(original.with_suffix(".json").resolve()),
        "image": str(copy.resolve()),
        "identical": True,
    }


@pytest.mark.slow
def test_rerender_of_an_image_that_shared_its_call_is_close_and_says_so(
    env: dict[str, str], tmp_path: Path, example_plan: Path
) -> None:
    profile = tmp_path / "batched.yaml"
    profile.write_text(FAST_PROFILE.replace("steps: 3", "steps: 3\n  batch: 2"))
    args = ["render", str(example_plan), "--style", "modern", "--seeds", "2", "--profile", str(profile)]
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    original = sorted((tmp_path / "a").rglob("seed-1_*.png"))[0]
    assert json.loads(original.with_suffix(".json").read_text())["call"] == {"images": 2, "tasks": 2}
    again = CliRunner().invoke(app, ["rerender", str(original.with_suffix(".json")), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    where, verdict = again.stdout.strip().splitlines()
    copy = np.asarray(Image.open(where), dtype=np.int16)
    difference = np.abs(copy - np.asarray(Image.open(original), dtype=np.int16)).max(axis=2)
    assert difference.max() <= 1
    if difference.any():
        differing = np.count_nonzero(difference)
        assert verdict == (
            f"differs from the original by at most 1/255, in {differing} of {difference.size} pixels "
            f"({differing / difference.size:.2%})"
        )
    else:
        assert verdict == "identical to the original, bit for bit"
    assert again.stderr.strip() == (
        "archfarm: warning: the image shared its pipeline call with 1 other task(s): rendered alone, it matches "
        "within 1/255, not bitwise"
    )


def test_rerender_refuses_what_is_not_a_sidecar(env: dict[str, str], tmp_path: Path) -> None:
    bogus = tmp_path / "x.json"
    bogus.write_text("{}")
    result = CliRunner().invoke(app, ["rerender", str(bogus)])
    assert result.exit_code == 2 and "not an archfarm sidecar" in result.stderr


@pytest.mark.slow
def test_every_control_kind_and_sdxl_render_end_to_end(env: dict[str, str], tmp_path: Path, example_plan: Path) -> None:
    """canny + depth + plan-depth + the plan itself + a map made elsewhere, then the tiny SDXL profile."""
    pose = tmp_path / "pose.png"
    Image.new("RGB", (40, 60), "black").save(pose)
    profile = tmp_path / "all.yaml"
    profile.write_text(
        "base: tiny-sd15\nwidth: 64\nheight: 64\nsteps: 3\nseeds_per_task: 2\ncontrols:\n"
        "  - {kind: canny, scale: 0.9, start: 0.0, end: 0.5}\n"
        "  - {kind: depth, scale: 0.6, resolution: 64}\n"
        "  - {kind: plan-depth, scale: 0.6, start: 0.2}\n"
        f"  - {{kind: image, image: {pose}, scale: 1.2}}\n"
    )
    for name, args in (("all", ["--profile", str(profile)]), ("xl", ["--profile", "tiny-sdxl"])):
        result = CliRunner().invoke(
            app,
            ["render", str(example_plan), "--style", "modern", "--seeds", "2", *args, "--out", str(tmp_path / name)],
        )
        assert result.exit_code == 0, result.output
        sidecars = sorted((tmp_path / name).rglob("*.json"))
        assert len(sidecars) == 2
    meta = json.loads(sidecars[0].read_text())
    assert meta["models"]["base"]["name"] == "tiny-sdxl"
    combined = json.loads(sorted((tmp_path / "all").rglob("*.json"))[0].read_text())
    assert [u["kind"] for u in combined["profile"]["controls"]] == ["canny", "depth", "plan-depth", "image"]
    assert len(combined["profile"]["controls"][3]["image_sha256"]) == 64
    assert len(combined["models"]["controlnets"]) == 4


def test_a_bad_control_image_is_refused_before_anything_is_stored(
    env: dict[str, str], tmp_path: Path, example_plan: Path
) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(f"base: tiny-sd15\ncontrols: [{{kind: image, image: {tmp_path / 'nope.png'}}}]\n")
    result = CliRunner().invoke(
        app,
        [
            "render",
            str(example_plan),
            "--style",
            "modern",
            "--seeds",
            "1",
            "--profile",
            str(profile),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2 and "nope.png: no such file" in result.stderr
    assert jobs_in(tmp_path / "archfarm.db") == 0 and not (tmp_path / "out").exists()


def test_version_styles_profiles_and_plain_flags_in_help(env: dict[str, str]) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.startswith("archfarm ")
    styles = runner.invoke(app, ["styles"]).output
    assert "japandi\n  prompt: japandi interior" in styles and "  negative: " in styles
    profiles = runner.invoke(app, ["profiles"]).output
    assert "sd15-archviz\n  base sd15 (sd15); controls: canny 0.9 [0-1], plan-depth 0.6 [0-1]" in profiles
    assert "flux-archviz\n  base flux-dev (flux); " in profiles
    assert (
        "licences: CreativeML OpenRAIL-M, OpenRAIL" in profiles and "licences: CreativeML OpenRAIL++-M, MIT" in profiles
    )
    submit_help = runner.invoke(app, ["submit", "--help"]).output
    assert "--wait " in submit_help and "<bool>" not in submit_help
    render_help = " ".join(runner.invoke(app, ["render", "--help"]).output.split())
    assert "`archfarm styles`" in render_help and "sd15-archviz" in render_help


def test_maps_writes_what_the_engine_gets_and_warns_when_nearly_empty(
    env: dict[str, str], tmp_path: Path, example_plan: Path
) -> None:
    from workers.preprocessors.canny import AdaptiveCanny

    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 200), "white").save(blank)
    result = CliRunner().invoke(
        app, ["maps", str(example_plan), str(blank), "--profile", "tiny-archviz", "--out", str(tmp_path / "maps")]
    )
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.png"))
    assert written == [
        "blank/1-canny.png",
        "blank/2-plan-depth.png",
        "floorplan/1-canny.png",
        "floorplan/2-plan-depth.png",
    ]
    canny = Image.open(tmp_path / "maps" / "floorplan" / "1-canny.png")
    assert canny.size == (128, 128)
    assert np.array_equal(np.asarray(canny), np.asarray(AdaptiveCanny()(Image.open(example_plan), 128, 128)))
    assert f"floorplan unit 1 canny: {tmp_path / 'maps' / 'floorplan' / '1-canny.png'}\n" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("archfarm: warning: ")]
    assert warnings[0] == (
        "archfarm: warning: blank: the canny control map at 128×128 has 0 edge pixels (0.0%): the ControlNet will "
        "see almost nothing; `archfarm maps` shows it (for canny, try `blur: 0`, a lower `sigma` or a larger render)"
    )
    assert not any(line.startswith("archfarm: warning: floorplan") for line in warnings)


@pytest.mark.slow
def test_render_save_maps_writes_the_maps_beside_the_images(
    env: dict[str, str], tmp_path: Path, example_plan: Path
) -> None:
    result = CliRunner().invoke(
        app, ["render", str(example_plan), "--style", "modern", "--seeds", "1", "--save-maps", "--out", "out"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "maps" / "floorplan" / "1-plan-depth.png").is_file()
    assert len(list((tmp_path / "out" / "floorplan").rglob("*.png"))) == 1


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("/dev/null", "'file:///dev/null' is a system folder"),
        ("/proc/archfarm", "is a system folder"),
        ("file", "is not a folder"),
    ],
)
def test_outputs_that_are_no_place_for_renders_are_refused(
    env: dict[str, str], tmp_path: Path, example_plan: Path, out: str, expected: str
) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    result = CliRunner().invoke(app, ["render", str(example_plan), "--style", "modern", "--seeds", "1", "--out", out])
    assert result.exit_code == 2 and expected in result.stderr
    assert jobs_in(tmp_path / "archfarm.db") == 0


def test_json_commands_report_errors_as_json_with_the_same_exit_code(env: dict[str, str]) -> None:
    expected = "no job 'not-a-job' (give its id, or at least 4 of its first characters)"
    result = CliRunner().invoke(app, ["status", "not-a-job", "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout) == {"error": expected}
    plain = CliRunner().invoke(app, ["status", "not-a-job"])
    assert plain.exit_code == 2 and plain.stderr.strip() == f"archfarm: error: {expected}"


@pytest.mark.slow
def test_a_job_is_named_by_the_first_characters_of_its_id(
    env: dict[str, str], tmp_path: Path, example_plan: Path
) -> None:
    """The dashboard shows 8 characters of an id: every command that takes a job takes them (4 at least)."""
    (tmp_path / "fast.yaml").write_text(FAST_PROFILE.removeprefix("profile:\n").replace("  ", ""))
    args = ["render", str(example_plan), "--style", "modern", "--seeds", "1", "--profile", "fast.yaml"]
    rendered = CliRunner().invoke(app, args)
    assert rendered.exit_code == 0, rendered.output
    job_id = rendered.stdout.split()[1].rstrip(":")
    status = CliRunner().invoke(app, ["status", job_id[:8]])
    assert status.exit_code == 0 and status.stdout.startswith(f"{job_id} render: succeeded")
    assert CliRunner().invoke(app, ["results", job_id[:4], "--json"]).exit_code == 0
    engine = create_engine(f"sqlite:///{tmp_path / 'archfarm.db'}")
    with engine.begin() as connection:  # a second job whose id starts the same way
        twin = job_id[:9] + ("1111" if job_id[9:13] != "1111" else "2222") + "-4000-8000-000000000000"
        row = connection.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one()
        connection.execute(Job.__table__.insert().values({**row, "id": twin}))
    engine.dispose()
    for prefix, expected in [
        (job_id[:8], f"{job_id[:8]!r} is the start of several jobs' ids: give more of it"),
        (job_id[:9], f"{job_id[:9]!r} is the start of several jobs' ids: give more of it"),
        (job_id[:13], None),
        ("abc", "no job 'abc' (give its id, or at least 4 of its first characters)"),
        ("ffff0000", "no job 'ffff0000'"),
    ]:
        result = CliRunner().invoke(app, ["status", prefix])
        if expected is None:
            assert result.exit_code == 0 and result.stdout.startswith(job_id), result.output
        else:
            assert result.exit_code == 2 and result.stderr.strip() == f"archfarm: error: {expected}"


@pytest.mark.slow
def test_pillows_own_warnings_never_reach_the_terminal(env: dict[str, str], tmp_path: Path) -> None:
    """A plan over Pillow's own limit but under archfarm's makes Pillow warn before archfarm refuses or reads it:
    the user sees archfarm's one line only."""
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # 144 M pixels: Pillow warns above 89 M
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "render", "bomb.png", "--style", "modern", "--seeds", "1"],
        env={**env, "ARCHFARM_MAX_IMAGE_PIXELS": "100000000"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "archfarm: error: bomb.png: 12000×12000 pixels is over the limit of 100000000 (decompression bomb?)"
    )
