"""The REST API against the real services: submit, status, cancel, results with pre-signed links."""

from __future__ import annotations

import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from producer.api import create_app
from shared.config import Settings
from shared.db.models import Task, TaskStatus
from shared.errors import InvalidInput
from tests.conftest import queued_messages
from tests.processes import wait_for
from workers.lifecycle import Lifecycle
from workers.policy import Limits
from workers.training.synthetic import write_boxes
from workers.training.trainer import Progress

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
    first = api.get(f"/jobs/{job_id}/results", params={"limit": 1})
    after = api.get(f"/jobs/{job_id}/results", params={"limit": 2, "cursor": first.json()["artifacts"][0]["id"]})
    assert first.headers["link"] == f'</jobs/{job_id}/results?limit=1&cursor={body["artifacts"][0]["id"]}>; rel="next"'
    assert [a["id"] for a in after.json()["artifacts"]] == [a["id"] for a in body["artifacts"][1:3]]


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
        ({"plans": ["/etc/passwd"]}, "plans.0: '/etc/passwd': the API takes s3:// URLs under s3://"),
        ({"output": "file:///tmp/x"}, "output: 'file:///tmp/x': the API takes s3:// URLs under s3://"),
        ({"plans": ["s3://other-bucket/plan.png"]}, "plans.0: 's3://other-bucket/plan.png': the API takes s3://"),
        ({"output": "s3://other-bucket/renders"}, "output: 's3://other-bucket/renders': the API takes s3://"),
        ({"seeds": [True, False]}, "seeds.0: should be a valid integer (got True)"),
        ({"seeds": ["1", "2"]}, "seeds.0: should be a valid integer (got '1')"),
        ({"output": ""}, "output: String should have at least 1 character"),
        ({"profile": {**PROFILE, "base": "/root"}}, "profile.base: a model folder is accepted from the API only"),
        (
            {"profile": {**PROFILE, "controls": [{"kind": "depth", "depth_model": "/nonexistent"}]}},
            "profile.controls.0.depth_model: a model folder is accepted from the API only",
        ),
        ({"styles": ["gothic"]}, "styles: unknown style 'gothic'"),
        (
            {"profile": {**PROFILE, "controls": [{"kind": "image", "image": "/dev/zero"}]}},
            "profile.controls.0.image: '/dev/zero': the API takes s3:// URLs under s3://",
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


def training(dataset: str, output: str, **train: object) -> dict:
    spec = {"base": "tiny-sd15", "dataset": dataset, "resolution": 64, "max_steps": 4, **train}
    return {"name": "boxes", "train": spec, "output": output}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"dataset": "/srv/boxes"}, "train.dataset: '/srv/boxes': the API takes s3:// URLs under s3://"),
        ({"dataset": "s3://other-bucket/boxes"}, "train.dataset: 's3://other-bucket/boxes': the API takes s3://"),
        ({"init": "/models/cn"}, "train.init: a model folder is accepted from the API only"),
        ({"init": "s3://other-bucket/cn"}, "train.init: 's3://other-bucket/cn': the API takes s3://"),
        ({"base": "/root"}, "train.base: a model folder is accepted from the API only"),
        (
            {"validation": {"prompts": ["a room"], "images": ["/etc/passwd"]}},
            "train.validation.images.0: '/etc/passwd': the API takes s3:// URLs under s3://",
        ),
        ({"resolution": 100}, "train.resolution: 100 is not a multiple of 8"),
        ({"output": "/tmp/out"}, "output: '/tmp/out': the API takes s3:// URLs under s3://"),
    ],
)
def test_bad_training_specs_are_refused_with_one_line(
    api: TestClient, s3_bucket: str, changes: dict, expected: str, farm_env: dict[str, str]
) -> None:
    spec = training(f"s3://{s3_bucket}/datasets/boxes", changes.get("output", f"s3://{s3_bucket}/training/boxes"))
    spec["train"].update({key: value for key, value in changes.items() if key != "output"})
    response = api.post("/jobs", json=spec)
    assert response.status_code == 422 and expected in response.json()["detail"]
    assert api.get("/jobs").json() == []
    assert queued_messages(farm_env["ARCHFARM_BROKER_URL"], f"{farm_env['ARCHFARM_QUEUE']}.train") == 0


def test_a_training_spec_is_queued_on_its_pool_and_its_progress_shown_in_the_api_and_the_dashboard(
    api: TestClient, s3_server, s3_bucket: str, tmp_path: Path, farm_env: dict[str, str]
) -> None:
    write_boxes(tmp_path / "boxes", 2, 64)
    for path in (p for p in (tmp_path / "boxes").rglob("*") if p.is_file()):
        key = f"datasets/boxes/{path.relative_to(tmp_path / 'boxes').as_posix()}"
        s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    output = f"s3://{s3_bucket}/training/boxes"
    spec = training(f"s3://{s3_bucket}/datasets/boxes", output)
    response = api.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "queued" and created["pool"] == "train" and created["total"] == 1
    assert created["training"]["model_url"] == f"{output}/controlnet" and created["training"]["step"] is None
    assert queued_messages(farm_env["ARCHFARM_BROKER_URL"], f"{farm_env['ARCHFARM_QUEUE']}.train") == 1
    assert "step 0/–" in api.get("/").text

    # Every field the trainer reports: one the API's answer model lacked would be dropped from the answer.
    progress = asdict(Progress(step=3, max_steps=4, loss=0.25, lr=1e-5, samples_per_s=12.5, skipped_rows=1))
    farm = api.app.state.farm  # type: ignore[attr-defined]
    with farm.sessions.begin() as session:  # what the worker running it writes every few seconds
        session.execute(
            update(Task)
            .where(Task.job_id == created["id"])
            .values(status=TaskStatus.RUNNING, worker="test#1", started_at=func.now(), progress=progress)
        )
    view = api.get(f"/jobs/{created['id']}").json()
    assert view["status"] == "running" and view["training"] == {**progress, "model_url": f"{output}/controlnet"}
    page = api.get(f"/ui/jobs/{created['id']}").text
    assert 'aria-valuenow="75"' in page and "0.2500" in page and f"{output}/controlnet" in page
    assert "Contact sheet" not in page and "step 3/4" in api.get("/").text
    sheet = api.get(f"/jobs/{created['id']}/sheet")
    assert sheet.status_code == 422 and "trains a ControlNet: it has no contact sheet" in sheet.json()["detail"]
    document = api.get("/openapi.json").json()
    components = document["components"]["schemas"]
    body = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    answer = document["paths"]["/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert conforms(spec, body, components) and conforms(view, answer, components)


def test_missing_and_unreadable_plans_get_one_answer_and_ids_are_checked_first(
    api: TestClient, s3_server, s3_bucket: str
) -> None:
    """No oracle: a missing object and an object that is no image are refused alike; a model folder outside
    the roots is refused the same whether it exists or not."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="plans/notes.txt", Body=b"not an image")
    answers = {
        url: api.post("/jobs", json=job(url)).json()["detail"]
        for url in (f"s3://{s3_bucket}/plans/nope.png", f"s3://{s3_bucket}/plans/notes.txt")
    }
    assert [detail.split(": ", 1)[1] for detail in answers.values()] == ["not a readable image"] * 2
    folders = [
        api.post("/jobs", json=job(f"s3://{s3_bucket}/x.png", profile={**PROFILE, "base": base}))
        for base in ("/root", "/no-such-dir")
    ]
    assert folders[0].json() == folders[1].json() and folders[0].status_code == 422
    assert api.get("/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
    for bad in ("a%00b", "x" * 5000, "..%2F..%2Fetc"):
        response = api.get(f"/jobs/{bad}")
        assert response.status_code == 404 and len(response.text) < 200


def test_a_huge_value_is_not_echoed_back(api: TestClient, s3_plan: str) -> None:
    response = api.post("/jobs", json=job(s3_plan, name="n" * 5_000_000))
    assert response.status_code == 422 and len(response.content) < 500


def test_model_roots_admit_folders_under_them_only() -> None:
    from producer.api import check_remote
    from shared.spec import JobSpec

    settings = Settings(storage_url="s3://farm/renders", api_model_roots=["/models"])
    for base, ok in [("/models/sd15", True), ("/models/../etc", False), ("/modelsx/a", False), ("sd15", True)]:
        spec = JobSpec.model_validate(job("s3://farm/p.png", profile={**PROFILE, "base": base}))
        if ok:
            check_remote(spec, settings)
        else:
            with pytest.raises(InvalidInput, match="ARCHFARM_API_MODEL_ROOTS"):
                check_remote(spec, settings)


def test_without_a_broker_the_api_refuses_to_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", broker_url=None)
    with TestClient(create_app(settings)) as client:
        response = client.post("/jobs", json=job("s3://bucket/plan.png"))
    assert response.status_code == 503


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus' text format, or None."""
    for line in text.splitlines():
        sample = line.split("{", 1)[0].split(" ", 1)[0]
        if sample == name and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_follow_a_real_job(api: TestClient, start_workers, s3_plan: str) -> None:
    job_id = api.post("/jobs", json=job(s3_plan)).json()["id"]
    queued = api.get("/metrics").text
    assert metric(queued, "archfarm_tasks", job=job_id, status="queued") == 4
    assert (metric(queued, "archfarm_queue_messages") or 0) >= 4
    start_workers("cpu:1")
    wait_for(lambda: api.get(f"/jobs/{job_id}").json()["status"] == "succeeded", 120, "the job to finish")
    done = api.get("/metrics").text
    assert metric(done, "archfarm_tasks", job=job_id, status="succeeded") == 4
    assert metric(done, "archfarm_tasks", job=job_id, status="queued") is None
    assert (metric(done, "archfarm_images_rendered_total") or 0) >= 4
    assert metric(done, "archfarm_task_seconds_count") == 4
    assert (metric(done, "archfarm_worker_images_total") or 0) >= 4
    assert (metric(done, "archfarm_worker_heartbeat_age_seconds") or 0) < 60


def test_every_error_is_one_problem_shape_and_created_jobs_have_a_location(api: TestClient, s3_plan: str) -> None:
    invalid = api.post("/jobs", json=job(s3_plan, seeds=[]))
    malformed = api.get("/jobs", params={"limit": "many"})
    unknown = api.get("/jobs/00000000-0000-0000-0000-000000000000")
    no_route = api.get("/nowhere")
    for response, status in ((invalid, 422), (malformed, 422), (unknown, 404), (no_route, 404)):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert set(body) == {"type", "title", "status", "detail"} and body["status"] == status
    assert malformed.json()["detail"].startswith("query.limit: should be a valid integer")
    created = api.post("/jobs", json=job(s3_plan))
    assert created.status_code == 201 and created.headers["location"] == f"/jobs/{created.json()['id']}"


def test_readiness_says_what_is_down(api: TestClient, farm_env: dict[str, str], tmp_path: Path) -> None:
    assert api.get("/readyz").json() == {"status": "ok", "database": "ok", "broker": "ok"}
    settings = Settings(**{"database_url": f"sqlite:///{tmp_path / 'a.db'}", "broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(settings)) as client:
        down = client.get("/readyz")
    assert down.status_code == 503 and down.json()["detail"].startswith("broker: ")


def test_a_client_without_storage_credentials_uploads_its_plan_and_submits(api: TestClient, example_plan: Path) -> None:
    ticket = api.post("/uploads", json={"name": "ground floor.png"})
    assert ticket.status_code == 201 and ticket.json()["method"] == "PUT"
    put = urllib.request.Request(ticket.json()["upload_url"], data=example_plan.read_bytes(), method="PUT")
    with urllib.request.urlopen(put, timeout=10) as response:  # plain HTTP: no AWS keys, no signing here
        assert response.status == 200
    created = api.post("/jobs", json=job(ticket.json()["url"]))
    assert created.status_code == 201, created.text
    refused = api.post("/uploads", json={"name": "tool.exe"})
    assert refused.status_code == 422 and "uploads take .png" in refused.json()["detail"]


def conforms(value: object, schema: dict, components: dict) -> bool:
    """A hand check of a JSON value against an OpenAPI schema: refs, anyOf, oneOf, types, required properties,
    enums and constants."""
    if "$ref" in schema:
        return conforms(value, components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "anyOf" in schema:
        return any(conforms(value, option, components) for option in schema["anyOf"])
    if "oneOf" in schema:
        return sum(conforms(value, option, components) for option in schema["oneOf"]) == 1
    if ("enum" in schema and value not in schema["enum"]) or ("const" in schema and value != schema["const"]):
        return False
    kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}
    kind = schema.get("type")
    if kind == "null":
        return value is None
    if kind is not None and (not isinstance(value, kinds[kind]) or (kind == "integer" and isinstance(value, bool))):
        return False
    if kind == "array":
        return all(conforms(item, schema.get("items", {}), components) for item in value)  # type: ignore[union-attr]
    if kind == "object" and isinstance(value, dict):
        properties = schema.get("properties", {})
        if not set(schema.get("required", [])) <= set(value):
            return False
        return all(conforms(item, properties[key], components) for key, item in value.items() if key in properties)
    return True


def test_the_schema_describes_requests_and_answers_as_they_are(
    api: TestClient, s3_plan: str, s3_server, s3_bucket: str
) -> None:
    document = api.get("/openapi.json").json()
    components = document["components"]["schemas"]
    body = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"oneOf": [{"$ref": "#/components/schemas/JobSpec"}, {"$ref": "#/components/schemas/TrainingSpec"}]}
    assert {"plans", "styles", "seeds", "profile"} <= set(components["JobSpec"]["required"])
    assert conforms(job(s3_plan), body, components) and not conforms({"plans": []}, body, components)
    answers = document["paths"]["/jobs/{job_id}"]["get"]["responses"]
    assert answers["404"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
    }
    created = api.post("/jobs", json=job(s3_plan)).json()
    live = {
        "/jobs/{job_id}": api.get(f"/jobs/{created['id']}").json(),
        "/jobs": api.get("/jobs").json(),
        "/jobs/{job_id}/results": api.get(f"/jobs/{created['id']}/results").json(),
        "/workers": api.get("/workers").json(),
    }
    for path, value in live.items():
        schema = document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert conforms(value, schema, components), path
    problem = api.get("/jobs/00000000-0000-0000-0000-000000000000").json()
    assert conforms(problem, {"$ref": "#/components/schemas/Problem"}, components)
