"""Upscales: the grid, the blend, the seam score, the assembly's memory, and whole upscale jobs (embedded and on
three real workers, one of them killed)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from producer.client import Farm
from shared.config import Settings
from shared.db.status import JobStatus
from shared.errors import InvalidInput
from shared.spec import JobSpec
from shared.tiles import Grid, positions, ramp, tile_seed
from workers.assembly import assemble, blend, seam_score

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 4, "controls": [{"kind": "canny"}]}
SEAM_BOUND = 1.5
"""A blended upscale's seam score stays below this: its tile edges no steeper than 1.5 times the image's mean
gradient. A hard cut between tiles 12 levels apart scores 10 and more (below); the tiles' own texture keeps an
assembly of real renders near 1."""


# --- the grid and the blend -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(512, 128, 16), (520, 128, 16), (1000, 512, 64), (512, 512, 64)]
)
def test_tiles_cover_the_side_overlap_enough_and_their_weights_sum_to_one(length: int, tile: int, overlap: int) -> None:
    starts = positions(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))  # overlap at least `overlap`
    total = np.zeros(length)
    for start, weights in zip(starts, ramp(length, starts, tile, overlap), strict=True):
        total[start : start + tile] += weights
    assert np.allclose(total, 1.0)
    assert len({tile_seed(7, i) for i in range(1000)}) == 1000 and tile_seed(7, 0) != tile_seed(8, 0)


def _grid_image(grid: Grid, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (grid.height, grid.width, 3), dtype=np.uint8)


def _crops(grid: Grid, image: np.ndarray, offsets: np.ndarray | None = None):  # type: ignore[no-untyped-def]
    def read(index: int) -> np.ndarray:
        left, top, right, bottom = grid.box(index)
        crop = image[top:bottom, left:right]
        if offsets is None:
            return crop
        return np.clip(crop.astype(int) + offsets[index], 0, 255).astype(np.uint8)

    return read


def test_tiles_that_reproduce_their_crop_assemble_into_the_input_bit_for_bit() -> None:
    grid = Grid(520, 392, 128, 16)
    image = _grid_image(grid)
    assert np.array_equal(blend(grid, _crops(grid, image)), image)
    assert np.array_equal(blend(grid, _crops(grid, image), deep=True), image.astype(np.uint16) * 257)
    png = assemble(grid, _crops(grid, image), "png")
    assert np.array_equal(cv2.imdecode(np.frombuffer(png.data, np.uint8), cv2.IMREAD_COLOR), image)
    tiff = assemble(grid, _crops(grid, image), "tiff16")
    decoded = cv2.imdecode(np.frombuffer(tiff.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, image.astype(np.uint16) * 257)
    assert max(png.preview.shape[:2]) == 512 and png.preview.dtype == np.uint8


def test_tiles_a_brightness_step_apart_leave_no_step_at_their_borders() -> None:
    """A smooth image cut into tiles, each brightened or darkened by up to 12 levels (what two tiles rendered
    on their own may disagree by): blended, no pixel pair across a tile edge differs by more than a couple of
    levels and the seam score stays under the bound; pasted hard, the steps show and the score says so."""
    grid = Grid(520, 392, 128, 32)
    ys, xs = np.mgrid[0 : grid.height, 0 : grid.width]
    smooth = np.stack([xs * 0.4 + 20, ys * 0.5 + 20, (xs + ys) * 0.2 + 20], axis=-1).astype(np.uint8)
    offsets = np.random.default_rng(1).integers(-12, 13, grid.count)
    offsets[0] = 12
    offsets[1] = -12
    read = _crops(grid, smooth, offsets)
    blended = blend(grid, read)
    pasted = np.zeros_like(smooth)
    for index in range(grid.count):
        left, top, right, bottom = grid.box(index)
        pasted[top:bottom, left:right] = read(index)
    columns, rows = grid.edges()
    step = np.abs(np.diff(blended.astype(int), axis=1))[:, [c - 1 for c in columns]].max()
    assert step <= 3, step
    assert seam_score(blended, grid) < SEAM_BOUND < 10 < seam_score(pasted, grid)


def test_a_6144_by_4096_assembly_holds_less_than_a_float_copy_of_the_image() -> None:
    """126 synthetic 512² tiles assembled into a 6144×4096 PNG in a process of its own: its peak memory grows by
    more than the 8-bit output it holds (72 MiB: the measure sees it) and less than one float32 copy of the
    image (288 MiB): the output, one band of tile rows and scratch, never the whole image in floats."""
    code = textwrap.dedent(
        """
        import numpy as np
        from bench.memory import reset_peak, rss
        from shared.tiles import Grid
        from workers.assembly import assemble
        grid = Grid(6144, 4096, 512, 64)
        ys, xs = np.mgrid[0:512, 0:512]
        def read(index):
            left, top, _, _ = grid.box(index)
            tile = np.empty((512, 512, 3), np.uint8)
            tile[..., 0] = (xs + left) * 255 // 6143
            tile[..., 1] = (ys + top) * 255 // 4095
            tile[..., 2] = (xs + ys + index) % 256
            return tile
        read(0)
        reset_peak()
        before = rss()
        result = assemble(grid, read, "png")
        grown = rss("VmHWM") - before
        print(grid.count, grown * 1024, len(result.data))
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True, cwd=root
    )
    tiles, grown, encoded = map(int, done.stdout.split())
    assert tiles == 126 and encoded > 0
    assert 6144 * 4096 * 3 < grown < 6144 * 4096 * 3 * 4, f"assembly grew by {grown / 2**20:.0f} MiB"


# --- the spec --------------------------------------------------------------------------------------------------------


def test_an_upscale_is_refused_before_anything_is_stored_when_it_cannot_be_made(
    tmp_path: Path, example_plan: Path
) -> None:
    from producer.submit import prepare

    small, wide = tmp_path / "small.png", tmp_path / "wide.png"
    Image.new("RGB", (64, 48), "white").save(small)
    Image.new("RGB", (600, 400), "white").save(wide)
    job = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [1], "profile": PROFILE}
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", storage_url=str(tmp_path / "out"))
    for upscale, message in (
        ({"image": str(small)}, "as long_side or as scale"),
        ({"image": str(small), "scale": 2, "long_side": 512}, "as long_side or as scale"),
        ({"image": str(small), "scale": 4, "tile": 128, "overlap": 72}, "over half the tile"),
        ({"image": str(small), "scale": 4, "tile": 132}, "multiple of 8"),
        ({"image": "ftp://x/y.png", "scale": 4}, "unsupported URL scheme"),
    ):
        with pytest.raises(InvalidInput, match=message):
            JobSpec.from_document({**job, "upscale": upscale})
    with pytest.raises(InvalidInput, match="one plan and its one style"):
        JobSpec.from_document({**job, "styles": ["modern", "japandi"], "upscale": {"image": str(small), "scale": 4}})
    with pytest.raises(InvalidInput, match="a tile unit is an upscale's own"):
        JobSpec.from_document({**job, "profile": {**PROFILE, "controls": [{"kind": "tile"}]}})
    for upscale, message in (
        ({"image": str(wide), "scale": 16}, "over 8192 on a side"),
        ({"image": str(small), "scale": 2}, "smaller than a tile"),  # 128×96 from a 512 tile
        ({"image": str(tmp_path / "gone.png"), "scale": 4}, "no such file"),
    ):
        spec = JobSpec.from_document({**job, "upscale": upscale})
        with pytest.raises(InvalidInput, match=message):
            prepare(spec, settings)
    assert not (tmp_path / "state.db").exists()


def test_an_upscale_takes_its_tile_size_from_the_family_and_its_grid_from_the_image(
    tmp_path: Path, example_plan: Path
) -> None:
    from producer.submit import prepare

    image = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), "white").save(image)
    job = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [1, 2]}
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", storage_url=str(tmp_path / "out"))
    sd15 = prepare(
        JobSpec.from_document({**job, "profile": PROFILE, "upscale": {"image": str(image), "long_side": 3000}}),
        settings,
    )
    upscale = sd15.spec.upscale
    assert upscale is not None and (upscale.tile, upscale.overlap, upscale.size()) == (512, 64, (3000, 2000))
    assert len(sd15.tasks) == 2 * upscale.grid().count == 2 * 7 * 5  # per seed, every tile
    assert {t.stage for t in sd15.tasks} == {"tile"} and sd15.tasks[3].outputs[0].endswith("/tile-0003.png")
    xl = {**PROFILE, "base": "tiny-sdxl"}
    sdxl = prepare(
        JobSpec.from_document({**job, "profile": xl, "upscale": {"image": str(image), "scale": 8}}), settings
    )
    assert sdxl.spec.upscale is not None and (sdxl.spec.upscale.tile, sdxl.spec.upscale.overlap) == (1024, 128)


# --- whole upscales ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_upscale_renders_its_tiles_assembles_them_and_a_tile_rerenders_bitwise(
    embedded_settings: Settings, tmp_path: Path, example_plan: Path
) -> None:
    """The embedded path end to end: a 64² render enlarged 8 times in 25 tiles; the image has the size, a seam
    score under the bound, a thumbnail and a sidecar naming its source and every tile; its tiles are listed
    only when asked; a 16-bit TIFF is one; `rerender` of a tile reproduces it bit for bit."""
    from producer.rerender import rerender

    settings = embedded_settings
    with Farm(settings) as farm:
        source_job = farm.submit({"plans": [str(example_plan)], "styles": ["modern"], "seeds": [3], "profile": PROFILE})
        (source,) = farm.results(source_job)
        job_id = farm.submit(farm.upscaling(source.id, scale=8, tile=128, overlap=32))
        view = farm.status(job_id)
        assert view.status is JobStatus.SUCCEEDED and view.counts["succeeded"] == 26
        (image,) = farm.results(job_id)
        tiles = [a for a in farm.results(job_id, tiles=True) if a.stage == "tile"]
        assert (image.stage, image.width, image.height, image.parent_id) == ("upscale", 512, 512, source.id)
        assert image.seam is not None and image.seam < SEAM_BOUND
        assert len(tiles) == 25 and {(t.width, t.parent_id) for t in tiles} == {(128, source.id)}
        path = Path(image.url.removeprefix("file://"))
        assert Image.open(path).size == (512, 512) and path.with_suffix(".thumb.jpg").is_file()
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert (sidecar["stage"], sidecar["source"]["artifact"], sidecar["source"]["url"]) == (
            "upscale",
            source.id,
            source.url,
        )
        assert [t["artifact"] for t in sidecar["tiles"]] == sorted(t.id for t in tiles)
        assert sidecar["seam"] == image.seam and sidecar["seed"] == 3
        _, children = farm.lineage(source.id)
        assert [c.id for c in children] == [image.id]  # its tiles are not images of their own

        deep = farm.submit(farm.upscaling(source.id, long_side=256, tile=128, overlap=16, format="tiff16"))
        (tiff,) = farm.results(deep)
        decoded = cv2.imread(tiff.url.removeprefix("file://"), cv2.IMREAD_UNCHANGED)
        assert tiff.url.endswith(".tiff") and decoded.dtype == np.uint16 and decoded.shape == (256, 256, 3)

    tile = tiles[7]
    again = rerender(Path(tile.sidecar_url.removeprefix("file://")), tmp_path / "again", settings)
    assert again.comparison.identical, again.verdict


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.s3
@pytest.mark.slow
def test_an_8x_upscale_on_three_workers_survives_a_kill_and_each_tile_is_rendered_once(
    farm: Farm, farm_env: dict[str, str], start_workers, example_plan: Path, s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    """A 64² image enlarged 8 times (25 tiles of 128²) on three real workers, one worker's pool process
    SIGKILLed while a tile renders: every tile ends with one artifact, the tiles were spread over the workers,
    the killed tile ran again, the assembled image has its size and a seam score under the bound, and a tile
    re-rendered from its sidecar is the same image."""
    from sqlalchemy import func, select

    from producer.rerender import rerender
    from shared.db.models import Artifact, Task
    from tests.processes import children_of, wait_for_value
    from tests.test_farm import pid_of, running_task

    start_workers("cpu:3", expect=3)
    profile = {**PROFILE, "steps": 12}
    source_job = farm.submit({"plans": [str(example_plan)], "styles": ["modern"], "seeds": [5], "profile": profile})
    assert farm.wait(source_job, timeout=120).status is JobStatus.SUCCEEDED
    (source,) = farm.results(source_job)
    job_id = farm.submit(farm.upscaling(source.id, scale=8, tile=128, overlap=32))
    task = wait_for_value(lambda: running_task(farm, job_id), 60, "a tile to start")
    (child,) = children_of(pid_of(farm, task[1]))
    os.kill(child, signal.SIGKILL)
    assert farm.wait(job_id, timeout=300).status is JobStatus.SUCCEEDED
    with farm.sessions() as session:
        tiles = session.execute(
            select(Task.id, Task.worker, Task.attempts).where(Task.job_id == job_id, Task.stage == "tile")
        ).all()
        per_task = session.execute(
            select(Artifact.task_id, func.count()).where(Artifact.job_id == job_id).group_by(Artifact.task_id)
        ).all()
    assert len(tiles) == 25 and len({worker for _, worker, _ in tiles}) >= 2
    assert {count for _, count in per_task} == {1} and len(per_task) == 26  # 25 tiles and the image, once each
    assert next(attempts for task_id, _, attempts in tiles if task_id == task[0]) >= 2
    (image,) = farm.results(job_id)
    assert (image.width, image.height) == (512, 512) and image.seam is not None and image.seam < SEAM_BOUND
    key = image.url.split(f"{s3_bucket}/", 1)[1]
    png = s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert Image.open(io.BytesIO(png)).size == (512, 512)

    tile = next(a for a in farm.results(job_id, tiles=True) if a.stage == "tile")
    local = tmp_path / "tile"
    local.mkdir()
    for url in (tile.url, tile.sidecar_url):
        name = url.rsplit("/", 1)[1]
        local.joinpath(name).write_bytes(
            s3_server.client().get_object(Bucket=s3_bucket, Key=url.split(f"{s3_bucket}/", 1)[1])["Body"].read()
        )
    again = rerender(local / tile.sidecar_url.rsplit("/", 1)[1], tmp_path / "again", farm.settings)
    assert again.comparison.identical, again.verdict


def test_the_last_two_tiles_ending_at_once_add_the_assembly_exactly_once(
    tmp_path: Path, database_url: str, example_plan: Path
) -> None:
    """Two workers record an image's last two tiles in overlapping transactions, each looking for the other's
    tile before either commits: the later one waits at the job's row until the earlier commits, then sees both
    tiles done and adds the assembly (without the lock, neither would); a third look adds none."""
    import threading

    from sqlalchemy import select

    from producer.submit import persist, prepare
    from shared.db.models import Task
    from shared.db.session import make_engine, session_factory
    from shared.db.store import claim_task, finish_task
    from shared.db.upscales import TiledImage, assemble_when_tiled, lock_job

    image = tmp_path / "small.png"
    Image.new("RGB", (56, 32), "white").save(image)
    settings = Settings(database_url=database_url, storage_url=str(tmp_path / "out"))
    sessions = session_factory(make_engine(database_url))
    spec = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [4], "profile": PROFILE}
    job = prepare(JobSpec.from_document({**spec, "upscale": {"image": str(image), "scale": 4, "tile": 128}}), settings)
    assert len(job.tasks) == 2  # 224×128 in two tiles
    with sessions.begin() as session:
        persist(session, job)
        for task in job.tasks:
            claim_task(session, task.id, f"w-{task.id}")
    tiled = TiledImage(job.id, 0, 1, 2, 4, "upscales/x.png", None)
    counted, other_counted, added = threading.Event(), threading.Event(), []

    def finish(task_id: str, first: bool) -> None:
        with sessions.begin() as session:
            lock_job(session, job.id)
            assert finish_task(session, task_id, f"w-{task_id}")
            added.extend(assemble_when_tiled(session, tiled))
            (counted if first else other_counted).set()
            if first:  # commit only once the other has counted too, unless it waits at the job's row
                other_counted.wait(1.0)

    earlier = threading.Thread(target=finish, args=(job.tasks[0].id, True))
    earlier.start()
    counted.wait(10)
    finish(job.tasks[1].id, False)
    earlier.join(10)
    with sessions.begin() as session:
        assert assemble_when_tiled(session, tiled) == []
        assembly = session.scalars(select(Task).where(Task.stage == "assemble")).all()
    assert added == [a.id for a in assembly] and len(assembly) == 1
    assert (assembly[0].seeds, assembly[0].outputs, assembly[0].ordinal) == ([4], ["upscales/x.png"], 2)
    tile = job.tasks[0]
    assert (assembly[0].plan_digest, assembly[0].plan_name, assembly[0].style) == (
        tile.plan.digest,
        tile.plan.name,
        "modern",
    )
