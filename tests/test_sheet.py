"""The contact sheet and what feeds it, on SQLite and a local folder (no services): thumbnails written beside
each image, the artifact endpoints, pagination, the dashboard's pages, and `archfarm sheet` as PNG and HTML."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import delete, select, update
from typer.testing import CliRunner

from producer.api import create_app
from producer.cli import app
from shared.config import Settings
from shared.db.clock import database_time
from shared.db.models import Artifact, Task, TaskStatus, Worker
from shared.db.session import make_engine, session_factory
from tests.conftest import EXAMPLE_PLAN

PROFILE = "profile:\n  base: tiny-sd15\n  width: 96\n  height: 64\n  steps: 2\n  controls: [{kind: canny}]\n"
ROWS = ["ground / modern", "ground / japandi", "first / modern", "first / japandi"]


@dataclass(frozen=True)
class Rendered:
    folder: Path
    env: dict[str, str]
    job_id: str

    @property
    def settings(self) -> Settings:
        return Settings(
            database_url=self.env["ARCHFARM_DATABASE_URL"],
            storage_url=self.env["ARCHFARM_STORAGE_URL"],
            models_dir=Path(self.env["ARCHFARM_MODELS_DIR"]),
            broker_url=None,
        )


pytestmark = pytest.mark.slow  # every test reads one job rendered for the module


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Rendered:
    """2 plans × 2 styles × 2 seeds rendered by `archfarm render --job` in this process (the README's path)."""
    folder = tmp_path_factory.mktemp("sheet")
    (folder / "plans").mkdir()
    shutil.copy(EXAMPLE_PLAN, folder / "plans" / "ground.png")
    Image.open(EXAMPLE_PLAN).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "plans" / "first.png")
    (folder / "job.yaml").write_text(
        "name: villa\nplans: [plans/ground.png, plans/first.png]\nstyles: [modern, japandi]\nseeds: {count: 2}\n"
        + PROFILE
    )
    env = {
        "ARCHFARM_DATABASE_URL": f"sqlite:///{folder / 'state.db'}",
        "ARCHFARM_STORAGE_URL": str(folder / "renders"),
        "ARCHFARM_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        use(patch, env)
        result = CliRunner().invoke(app, ["render", "--job", str(folder / "job.yaml"), "--out", str(folder / "out")])
    assert result.exit_code == 0, result.output
    job_id = re.search(r"job ([0-9a-f-]{36}): 8 images", result.output)
    assert job_id, result.output
    return Rendered(folder, env, job_id[1])


def use(patch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Only these archfarm variables, as a user's shell with nothing else configured would have."""
    for key in [k for k in os.environ if k.startswith("ARCHFARM_")]:
        patch.delenv(key)
    for key, value in env.items():
        patch.setenv(key, value)


@pytest.fixture
def env(rendered: Rendered, monkeypatch: pytest.MonkeyPatch) -> Rendered:
    use(monkeypatch, rendered.env)
    return rendered


@pytest.fixture
def api(env: Rendered) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as client:
        yield client


def test_every_image_has_a_thumbnail_beside_it(rendered: Rendered) -> None:
    pngs = sorted((rendered.folder / "out").rglob("*.png"))
    assert len(pngs) == 8
    for png in pngs:
        thumb = png.with_name(png.name.removesuffix(".png") + ".thumb.jpg")
        with Image.open(thumb) as image:
            assert image.format == "JPEG" and image.size == (96, 64)  # never enlarged past the image


def test_artifact_endpoints_serve_by_id_and_refuse_anything_else(api: TestClient, rendered: Rendered) -> None:
    artifacts = api.get(f"/jobs/{rendered.job_id}/results").json()["artifacts"]
    first = artifacts[0]
    assert {a["plan"] for a in artifacts} == {"ground", "first"}
    png = Path(first["url"].removeprefix("file://")).read_bytes()
    image = api.get(f"/artifacts/{first['id']}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content == png
    download = api.get(f"/artifacts/{first['id']}/image", params={"download": "true"})
    name = f"{first['plan']}_{first['style']}_{first['url'].rsplit('/', 1)[1]}"
    assert download.headers["content-disposition"] == f'attachment; filename="{name}"'
    thumbnail = api.get(f"/artifacts/{first['id']}/thumbnail")
    assert thumbnail.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumbnail.content)).width == 96
    assert api.get(f"/artifacts/{first['id']}/sidecar").json()["seed"] == first["seed"]
    assert api.get(f"/artifacts/{first['id']}").json()["id"] == first["id"]
    unknown = max(a["id"] for a in artifacts) + 1
    for part in ("", "/image", "/thumbnail", "/sidecar"):
        response = api.get(f"/artifacts/{unknown}{part}")
        assert response.status_code == 404 and response.json()["detail"] == f"no image {unknown}"
    for bad in ("0", "-1", "abc", str(2**63), "..%2F..%2Fstate.db"):
        assert api.get(f"/artifacts/{bad}/image").status_code in (404, 422)
    assert api.get(f"/ui/artifacts/{unknown}").status_code == 404


def test_a_missing_thumbnail_is_made_from_the_png_and_kept(api: TestClient, rendered: Rendered) -> None:
    first = api.get(f"/jobs/{rendered.job_id}/results").json()["artifacts"][0]
    thumb = Path(first["url"].removeprefix("file://").removesuffix(".png") + ".thumb.jpg")
    thumb.unlink()
    response = api.get(f"/artifacts/{first['id']}/thumbnail")
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (96, 64)
    assert thumb.read_bytes() == response.content


def test_pages_of_results_sheet_and_jobs(api: TestClient, rendered: Rendered) -> None:
    job = rendered.job_id
    every = [a["id"] for a in api.get(f"/jobs/{job}/results").json()["artifacts"]]
    pages, url = [], f"/jobs/{job}/results?limit=3"
    while url:  # follow the Link headers: cursor pages
        response = api.get(url)
        pages.append(response.json()["artifacts"])
        url = response.headers.get("link", "").removeprefix("<").split(">;")[0]
    assert [len(p) for p in pages] == [3, 3, 2] and [a["id"] for p in pages for a in p] == every
    sheet = api.get(f"/jobs/{job}/sheet", params={"row": 1, "rows": 2, "seed": 1, "seeds": 5}).json()
    assert (sheet["rows_total"], sheet["seeds_total"], sheet["seeds"]) == (4, 2, [1])
    assert [f"{r['plan']} / {r['style']}" for r in sheet["rows"]] == ROWS[1:3]
    assert all(c["state"] == "rendered" and c["artifact"] in every for r in sheet["rows"] for c in r["cells"])
    page = api.get(f"/ui/jobs/{job}", params={"rows": 1, "seeds": 1, "row": 2}).text
    assert page.count('loading="lazy"') == 1 and "rows 3–3 of 4" in page and "seeds 1–1 of 2" in page
    assert "rows ↓" in page and "↑ rows" in page and "seeds →" in page
    assert [j["id"] for j in api.get("/jobs", params={"status": "succeeded"}).json()] == [job]
    assert api.get("/jobs", params={"status": "running"}).json() == []
    assert api.get("/jobs", params={"cursor": job}).json() == []  # nothing older than the only job
    assert api.get("/jobs", params={"cursor": "nope"}).status_code == 422
    assert api.get("/jobs", params={"status": "done"}).status_code == 422
    listing = api.get("/", params={"status": "succeeded"}).text
    assert f"/ui/jobs/{job}" in listing and "8/8" in listing and 'aria-valuenow="100"' in listing
    assert "No jobs failed" in api.get("/", params={"status": "failed"}).text


def test_the_sheet_marks_cells_without_an_image(env: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed task's cells say so, in the dashboard and in the files (on a copy of the state)."""
    state = tmp_path / "state.db"
    shutil.copy(env.folder / "state.db", state)
    settings = env.settings.model_copy(update={"database_url": f"sqlite:///{state}"})
    engine = make_engine(settings.database_url)
    with session_factory(engine).begin() as session:
        task_id = next(t.id for t in session.scalars(select(Task).where(Task.style == "japandi")) if t.seeds == [1])
        session.execute(update(Task).where(Task.id == task_id).values(status=TaskStatus.FAILED, error="out of ink"))
        session.execute(delete(Artifact).where(Artifact.task_id == task_id))
    engine.dispose()
    with TestClient(create_app(settings)) as client:
        page = client.get(f"/ui/jobs/{env.job_id}").text
        assert page.count('class="cell failed"') == 1 and "out of ink" in page and page.count('loading="lazy"') == 7
    monkeypatch.setenv("ARCHFARM_DATABASE_URL", settings.database_url)
    result = CliRunner().invoke(app, ["sheet", env.job_id, "--out", str(tmp_path / "sheet.html")])
    assert result.exit_code == 0, result.output
    assert "7 images (1 without an image)" in result.output
    assert "<span>failed</span>" in (tmp_path / "sheet.html").read_text()


def test_workers_page_marks_stale_and_dead_workers(api: TestClient, rendered: Rendered) -> None:
    engine = make_engine(rendered.env["ARCHFARM_DATABASE_URL"])
    with session_factory(engine).begin() as session:
        now = database_time(session)
        for name, beat, stopped in (("fresh", 1, None), ("late", 40, None), ("gone", 200, 100)):
            session.add(
                Worker(
                    id=f"{name}#1",
                    node=name,
                    device="cpu",
                    pid=1,
                    queues=["archfarm"],
                    models=["tiny-sd15"],
                    heartbeat_at=now - timedelta(seconds=beat),
                    stopped_at=None if stopped is None else now - timedelta(seconds=stopped),
                )
            )
    try:
        page = api.get("/ui/workers").text
        for name, state in (("fresh", "live"), ("late", "stale"), ("gone", "dead")):
            assert re.search(rf'<tr class="{state}">\s*<td>{name}<', page), state
        assert api.get("/ui/workers", params={"fragment": "workers"}).text.lstrip().startswith("<table")
    finally:
        with session_factory(engine).begin() as session:
            session.query(Worker).delete()
        engine.dispose()


def test_sheet_png_is_labelled_and_holds_every_image(env: Rendered, tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(app, ["sheet", env.job_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{out}: 4 plan × style rows × 2 seeds, 8 images\n" == result.output
    with Image.open(out) as image:
        labels = json.loads(image.text["archfarm.sheet"])
        assert labels == {"job": env.job_id, "rows": ROWS, "seeds": [0, 1]}
        sheet = image.convert("RGB")
    # Each cell's centre holds its image (rendered noise), not the white page: cells as large as the images
    # (96 px), 8 px apart.
    step = 96 + 8
    label_w = sheet.width - 2 * step - 8
    for row in range(4):
        for column in range(2):
            x = label_w + column * step + 48
            y = sheet.height - 8 - (4 - row) * step + 48
            assert sheet.getpixel((x, y)) != (255, 255, 255), (row, column)
    # The labels are drawn: dark pixels in the label column beside every row.
    for row in range(4):
        y = sheet.height - 8 - (4 - row) * step + 48
        assert min(sum(sheet.getpixel((x, y))) for x in range(8, label_w - 8)) < 200


def test_sheet_html_embeds_every_image_and_opens_offline(env: Rendered, tmp_path: Path) -> None:
    out = tmp_path / "sheet.html"
    result = CliRunner().invoke(app, ["sheet", env.job_id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    embedded = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(embedded) == 8
    for data in embedded:
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (96, 64)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: it opens offline
    for label in ("seed 0", "seed 1", "villa", *(f"ground / {s}, seed 1" for s in ("modern", "japandi"))):
        assert label in page
    assert [re.sub(r"<small>", " / ", m) for m in re.findall(r'<th scope="row">(.*?)</small>', page)] == ROWS


def test_sheet_refuses_unknown_jobs_and_formats(env: Rendered, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sheet", env.job_id, "--out", str(tmp_path / "sheet.pdf")])
    assert result.exit_code == 2 and "write a .png or an .html sheet" in result.output
    result = CliRunner().invoke(app, ["sheet", "nope", "--out", str(tmp_path / "sheet.png")])
    assert result.exit_code == 2 and "no job 'nope'" in result.output
