"""The REST API against the real services: submit, status, cancel, results with pre-signed links."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from producer.api import create_app
from shared.config import Settings
from shared.db.models import Task
from tests.conftest import queued_messages
from workers.lifecycle import Lifecycle
from workers.policy import Limits

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.s3]

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


@pytest.fixture
def api(farm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings())) as client:
        yield client


@pytest.fixture
def s3_plan(s3_server, s3_bucket: str, example_plan: Path) -> str:  # type: ignore[no-untyped-def]
    s3_server.client().put_object(Bucket=s3_bucket, Key="plans/ground.png", Body=example_plan.read_bytes())
    return f"s3://{s3_bucket}/plans/ground.png"


def job(plan: str, **changes: object) -> dict:
    return {
        "name": "api",
        "plans": [plan],
        "styles": ["modern", "industrial"],
        "seeds": [1, 2],
        "profile": PROFILE,
        **changes,
    }


def test_submit_queues_every_task_and_cancel_stops_them(
    api: TestClient, s3_plan: str, farm_env: dict[str, str]
) -> None:
    response = api.post("/jobs", json=job(s3_plan))
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert response.json()["status"] == "queued" and response.json()["total"] == 4
    assert queued_messages(farm_env["ARCHFARM_BROKER_URL"], farm_env["ARCHFARM_QUEUE"]) == 4
    assert api.get(f"/jobs/{job_id}").json()["counts"]["queued"] == 4
    assert [j["id"] for j in api.get("/jobs").json()] == [job_id]
    cancelled = api.post(f"/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["counts"]["cancelled"] == 4


def test_results_carry_presigned_links(api: TestClient, s3_plan: str, farm_env: dict[str, str]) -> None:
    job_id = api.post("/jobs", json=job(s3_plan)).json()["id"]
    farm = api.app.state.farm  # type: ignore[attr-defined]
    # What a worker would do with the messages.
    lifecycle = Lifecycle(
        farm.settings, farm.sessions, worker="test#1", node="test", send=lambda ids, delay: None, limits=Limits()
    )
    with farm.sessions() as session:
        task_ids = list(session.scalars(select(Task.id).where(Task.job_id == job_id)))
    for task_id in task_ids:
        lifecycle.run(task_id)
    lifecycle.close()
    body = api.get(f"/jobs/{job_id}/results").json()
    assert body["status"] == "succeeded" and len(body["artifacts"]) == 4
    with urllib.request.urlopen(body["artifacts"][0]["download_url"]) as response:  # noqa: S310 - loopback
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    page = api.get(f"/jobs/{job_id}/results", params={"offset": 1, "limit": 2}).json()["artifacts"]
    assert [a["id"] for a in page] == [a["id"] for a in body["artifacts"][1:3]]


def test_images_thumbnails_and_sidecars_come_from_s3_by_artifact_id(
    api: TestClient, s3_plan: str, s3_server, s3_bucket: str
) -> None:
    """Workers write a thumbnail beside each PNG; the API serves all three by artifact id, and nothing else."""
    job_id = api.post("/jobs", json=job(s3_plan)).json()["id"]
    farm = api.app.state.farm  # type: ignore[attr-defined]
    lifecycle = Lifecycle(
        farm.settings, farm.sessions, worker="test#1", node="test", send=lambda ids, delay: None, limits=Limits()
    )
    with farm.sessions() as session:
        for task_id in list(session.scalars(select(Task.id).where(Task.job_id == job_id))):
            lifecycle.run(task_id)
    lifecycle.close()
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix=f"renders/{job_id}/")["Contents"]
    keys = sorted(o["Key"] for o in listed)
    pngs = [k for k in keys if k.endswith(".png")]
    assert len(pngs) == 4 and [k for k in keys if k.endswith(".thumb.jpg")] == [
        k.removesuffix(".png") + ".thumb.jpg" for k in pngs
    ]
    artifact = api.get(f"/jobs/{job_id}/results").json()["artifacts"][0]
    stored = s3_server.client().get_object(Bucket=s3_bucket, Key=artifact["url"].split(f"{s3_bucket}/", 1)[1])
    assert api.get(f"/artifacts/{artifact['id']}/image").content == stored["Body"].read()
    thumbnail = api.get(f"/artifacts/{artifact['id']}/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.content[:3] == b"\xff\xd8\xff"  # a JPEG
    assert api.get(f"/artifacts/{artifact['id']}/sidecar").json()["job"]["id"] == job_id
    assert api.get(f"/artifacts/{artifact['id'] + 1000}/image").status_code == 404
    sheet = api.get(f"/jobs/{job_id}/sheet").json()
    assert [(r["plan"], r["style"]) for r in sheet["rows"]] == [("ground", "modern"), ("ground", "industrial")]
    assert sheet["seeds"] == [1, 2] and all(c["state"] == "rendered" for r in sheet["rows"] for c in r["cells"])


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"plans": ["/etc/passwd"]}, "plans: '/etc/passwd': the API takes s3:// URLs only"),
        ({"output": "file:///tmp/x"}, "output: 'file:///tmp/x': the API takes s3:// URLs only"),
        ({"styles": ["gothic"]}, "styles: unknown style 'gothic'"),
        (
            {"profile": {**PROFILE, "controls": [{"kind": "image", "image": "/dev/zero"}]}},
            "profile.controls.0.image: '/dev/zero': the API takes s3:// URLs only",
        ),
        ({"profile": {**PROFILE, "width": 100}}, "profile.width: 100 is not a multiple of 8"),
    ],
)
def test_bad_jobs_are_refused_with_one_line(
    api: TestClient, s3_plan: str, changes: dict, expected: str, farm_env: dict[str, str]
) -> None:
    response = api.post("/jobs", json=job(s3_plan, **changes))
    assert response.status_code == 422
    assert expected in response.json()["detail"]
    assert api.get("/jobs").json() == []
    assert queued_messages(farm_env["ARCHFARM_BROKER_URL"], farm_env["ARCHFARM_QUEUE"]) == 0


def test_missing_plan_object_and_unknown_job(api: TestClient, s3_bucket: str) -> None:
    response = api.post("/jobs", json=job(f"s3://{s3_bucket}/plans/nope.png"))
    assert response.status_code == 422 and "no such file" in response.json()["detail"]
    assert api.get("/jobs/00000000-0000-0000-0000-000000000000").status_code == 404


def test_without_a_broker_the_api_refuses_to_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", broker_url=None)
    with TestClient(create_app(settings)) as client:
        response = client.post("/jobs", json=job("s3://bucket/plan.png"))
    assert response.status_code == 503
