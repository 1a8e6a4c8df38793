"""The REST API against the real services: submit, status, cancel, results with pre-signed links."""

from __future__ import annotations

import io
import json
import re
import tracemalloc
import urllib.error
import urllib.request
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from producer.api import create_app
from producer.cli import app as cli
from producer.dashboard import MAX_OFFSET, MAX_ROW_ID
from producer.remote import check_remote
from shared.config import Settings
from shared.db.costs import record_cost
from shared.db.models import Artifact, Job, Task, TaskStatus, Worker
from shared.db.session import make_engine, session_factory
from shared.db.store import claim_task, finish_task, record_failure, register_worker
from shared.db.tokens import create_token
from shared.errors import InvalidInput
from shared.spec import MAX_ECHO, JobSpec, Profile
from shared.storage import Storages
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    with urllib.request.urlopen(body["artifacts"][0]["download_url"]) as response:  # loopback
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    first = api.get(f"/jobs/{job_id}/results", params={"limit": 1})
    after = api.get(f"/jobs/{job_id}/results", params={"limit": 2, "cursor": first.json()["artifacts"][0]["id"]})
    assert first.headers["link"] == f'</jobs/{job_id}/results?limit=1&cursor={body["artifacts"][0]["id"]}>; rel="next"'
    assert [a["id"] for a in after.json()["artifacts"]] == [a["id"] for a in body["artifacts"][1:3]]


@pytest.mark.slow
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
    details = api.get(f"/ui/artifacts/{artifact['id']}", params={"fragment": "artifact"}).text
    assert f'src="/jobs/{job_id}/plans/{artifact["plan_digest"]}"' in details  # the plan beside the render
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
        ({"profile": {**PROFILE, "base": "/root"}}, "profile.base: the API takes a model folder only as an absolute"),
        (
            {"profile": {**PROFILE, "controls": [{"kind": "depth", "depth_model": "/nonexistent"}]}},
            "profile.controls.0.depth_model: the API takes a model folder only as an absolute path",
        ),
        ({"styles": ["gothic"]}, "styles: unknown style 'gothic'"),
        (
            {"profile": {**PROFILE, "controls": [{"kind": "image", "image": "/dev/zero"}]}},
            "profile.controls.0.image: '/dev/zero': the API takes s3:// URLs under s3://",
        ),
        ({"profile": {**PROFILE, "width": 100}}, "profile.width: 100 is not a multiple of 8"),
    ],
)
@pytest.mark.slow
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
    return {"kind": "train", "name": "boxes", "train": spec, "output": output}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"dataset": "/srv/boxes"}, "train.dataset: '/srv/boxes': the API takes s3:// URLs under s3://"),
        ({"dataset": "s3://other-bucket/boxes"}, "train.dataset: 's3://other-bucket/boxes': the API takes s3://"),
        ({"init": "/models/cn"}, "train.init: the API takes a model folder only as an absolute path"),
        ({"init": "s3://other-bucket/cn"}, "train.init: 's3://other-bucket/cn': the API takes s3://"),
        ({"base": "/root"}, "train.base: the API takes a model folder only as an absolute path"),
        (
            {"validation": {"prompts": ["a room"], "images": ["/etc/passwd"]}},
            "train.validation.images.0: '/etc/passwd': the API takes s3:// URLs under s3://",
        ),
        ({"resolution": 100}, "train.resolution: 100 is not a multiple of 8"),
        ({"output": "/tmp/out"}, "output: '/tmp/out': the API takes s3:// URLs under s3://"),
    ],
)
@pytest.mark.slow
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
    assert sheet.status_code == 422
    assert "is a train job: only render jobs have a contact sheet" in sheet.json()["detail"]
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
    assert [detail.split(": ", 1)[1] for detail in answers.values()] == ["not a readable image of at most 64 MiB"] * 2
    folders = [
        api.post("/jobs", json=job(f"s3://{s3_bucket}/x.png", profile={**PROFILE, "base": base}))
        for base in ("/root", "/no-such-dir")
    ]
    assert folders[0].json() == folders[1].json() and folders[0].status_code == 422
    assert api.get("/jobs/00000000-0000-0000-0000-000000000000").status_code == 404
    for bad in ("a%00b", "x" * 5000, "..%2F..%2Fetc"):
        response = api.get(f"/jobs/{bad}")
        assert response.status_code == 404 and len(response.text) < 200


def test_no_answer_echoes_more_than_a_short_prefix_of_a_value_or_a_key(
    api: TestClient, s3_plan: str, s3_bucket: str
) -> None:
    huge = "k" * 5_000_000
    bodies = [
        job(s3_plan, name=huge),
        {**job(s3_plan), huge: 1},
        job(s3_plan, profile={**PROFILE, "controls": [{"kind": "canny", huge: 1}]}),
        job(s3_plan, profile={**PROFILE, "controls": [{"kind": huge}]}),
        {**training(f"s3://{s3_bucket}/datasets/boxes", f"s3://{s3_bucket}/training/boxes"), huge: 1},
    ]
    bodies[-1]["train"][huge] = 1
    for body in bodies:
        response = api.post("/jobs", json=body)
        assert response.status_code == 422 and len(response.content) < 1000, response.text[:300]
        assert "k" * (MAX_ECHO + 1) not in response.text
    for path in ("/", "/?fragment=jobs", "/jobs"):
        response = api.get(path, params={"status": "s" * 12_000})
        assert response.status_code == 422 and "s" * (MAX_ECHO + 1) not in response.text, path


def test_model_folders_are_taken_only_as_absolute_paths_under_the_roots() -> None:
    settings = Settings(storage_url="s3://farm/renders", api_model_roots=["/models"])
    cases = [
        ("/models/sd15", True),
        ("/models", True),
        ("sd15", True),
        ("owner/name", True),  # a hub id, whatever a folder of that name holds where the API runs
        ("/models/../etc", False),
        ("/modelsx/a", False),
        ("./models/sd15", False),
        ("../models/sd15", False),
        ("~/models/sd15", False),
    ]
    for base, ok in cases:
        spec = JobSpec.model_validate(job("s3://farm/p.png", profile={**PROFILE, "base": base}))
        if ok:
            check_remote(spec, settings)
            continue
        with pytest.raises(InvalidInput, match="ARCHFARM_API_MODEL_ROOTS") as refused:
            check_remote(spec, settings)
        assert "/models" not in str(refused.value).replace(base, ""), "a refusal names no folder of the server"


def test_a_bare_name_is_never_a_folder_where_the_api_runs(
    api: TestClient, s3_plan: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`srv/secretnet` beside the API process is a hub id to the API: it is neither read nor pinned as a folder,
    and the answer is the same whether such a folder exists, holds a model or not."""
    (tmp_path / "srv" / "secretnet").mkdir(parents=True)
    (tmp_path / "srv" / "secretnet" / "config.json").write_text("{}")
    (tmp_path / "srv" / "notamodel").mkdir()
    monkeypatch.chdir(tmp_path)
    profiles = [
        {**PROFILE, "controls": [{"kind": "canny", "model": name}]}
        for name in ("srv/secretnet", "srv/notamodel", "srv/nosuchdir")
    ] + [{**PROFILE, "base": "srv/notamodel"}]
    farm = api.app.state.farm  # type: ignore[attr-defined]
    for profile in profiles:
        created = api.post("/jobs", json=job(s3_plan, profile=profile))
        assert created.status_code == 201, created.text
        with farm.sessions() as session:
            stored = session.get(Job, created.json()["id"]).spec["profile"]
        assert (stored["base"], stored["controls"][0].get("model")) == (
            profile["base"],
            profile["controls"][0].get("model"),
        )


def test_prefixes_admit_whole_path_segments_only() -> None:
    settings = Settings(
        storage_url="s3://farm/renders",
        api_storage_prefixes=["s3://farm/in", "s3://farm/out/"],
        api_notify_prefixes=["https://hooks.example/farm"],
    )
    for url in ("s3://farm/in/a.png", "s3://farm/in/deep/a.png", "s3://farm/out/b.png"):
        check_remote(JobSpec.model_validate(job(url)), settings)
    for url in (
        "s3://farm/inbox/a.png",
        "s3://farm/in-other/a.png",
        "s3://farm/in?/a.png",
        "s3://farmhouse/in/a.png",
        "s3://farm/output/a.png",
        "s3://farm/in/../x/a.png",
        "s3://farm/in/%2e%2e/x/a.png",
    ):
        with pytest.raises(InvalidInput, match="the API takes s3:// URLs under"):
            check_remote(JobSpec.model_validate(job(url)), settings)
    plan = "s3://farm/in/a.png"
    check_remote(JobSpec.model_validate(job(plan, notify={"urls": ["https://hooks.example/farm/job"]})), settings)
    for hook in (
        "https://hooks.example/farmer",
        "https://hooks.example/farm.evil/x",
        "https://hooks.example.evil/farm/x",
        "https://hooks.example/farm/%2e%2e/admin",
    ):
        with pytest.raises(InvalidInput, match="the API takes notification URLs under"):
            check_remote(JobSpec.model_validate(job(plan, notify={"urls": [hook]})), settings)


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


def sample(text: str, name: str, **labels: str) -> float:
    """A sample that must be there: its absence fails, never passes as 0."""
    found = metric(text, name, **labels)
    assert found is not None, f"no {name} {labels} in /metrics"
    return found


@pytest.mark.slow
def test_metrics_follow_a_real_job(api: TestClient, start_workers, s3_plan: str) -> None:
    job_id = api.post("/jobs", json=job(s3_plan)).json()["id"]
    queued = api.get("/metrics").text
    assert metric(queued, "archfarm_tasks", job=job_id, status="queued") == 4
    assert sample(queued, "archfarm_queue_messages") >= 4
    work_left = api.get(f"/jobs/{job_id}").json()["work_left_s"]  # nobody measured it yet: the prior's
    assert work_left > 0 and sample(queued, "archfarm_backlog_seconds", pool="default") == pytest.approx(work_left)
    assert sample(queued, "archfarm_capacity", pool="default") == 0
    start_workers("cpu:1")
    wait_for(lambda: api.get(f"/jobs/{job_id}").json()["status"] == "succeeded", 120, "the job to finish")
    assert api.get(f"/jobs/{job_id}").json()["work_left_s"] is None
    done = api.get("/metrics").text
    assert sample(done, "archfarm_backlog_seconds", pool="default") == 0
    assert sample(done, "archfarm_capacity", pool="default") == 1
    assert metric(done, "archfarm_tasks", job=job_id, status="succeeded") == 4
    assert metric(done, "archfarm_tasks", job=job_id, status="queued") is None
    assert sample(done, "archfarm_images_rendered_total") >= 4
    assert metric(done, "archfarm_task_seconds_count") == 4
    assert sample(done, "archfarm_worker_images_total") >= 4
    assert sample(done, "archfarm_worker_heartbeat_age_seconds") < 60


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


def test_readiness_covers_storage_and_tells_why_only_to_a_token_holder(
    api: TestClient, tmp_path: Path, s3_bucket: str
) -> None:
    assert api.get("/readyz").json() == {"status": "ok", "database": "ok", "broker": "ok", "storage": "ok"}
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        broker_url=None,
        storage_url=f"s3://{s3_bucket}/renders",
        s3_endpoint_url="http://127.0.0.1:1",  # nothing listens there: S3 is down
    )
    with TestClient(create_app(settings)) as client:
        anonymous = client.get("/readyz")
        with client.app.state.farm.sessions.begin() as session:  # type: ignore[attr-defined]
            token = create_token(session, "ops", admin=True)
        told = client.get("/readyz", headers={"Authorization": f"Bearer {token}"})
    assert anonymous.status_code == 503 and anonymous.json()["detail"] == "storage: down"
    assert told.status_code == 503 and told.json()["detail"].startswith("storage: ") and "127.0.0.1:1" in told.text


def test_metrics_answer_at_their_own_path(api: TestClient) -> None:
    response = api.get("/metrics", follow_redirects=False)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "archfarm_images_rendered_total" in response.text


def put(url: str, body: bytes) -> int:
    """PUT `body` to a presigned URL as a client without AWS keys would: plain HTTP, Content-Length set."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT"), timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_client_without_storage_credentials_uploads_its_plan_under_its_name_and_submits(
    api: TestClient, example_plan: Path, s3_bucket: str
) -> None:
    data = example_plan.read_bytes()
    ticket = api.post("/uploads", json={"name": "../Ground floor.PNG", "size": len(data)})
    assert ticket.status_code == 201 and ticket.json()["method"] == "PUT" and ticket.json()["size"] == len(data)
    url = ticket.json()["url"]
    assert re.fullmatch(rf"s3://{s3_bucket}/renders/uploads/[0-9a-f-]{{36}}/Ground-floor\.png", url), url
    # S3 itself holds the client to the size it stated: the signature covers the Content-Length.
    assert [put(ticket.json()["upload_url"], body) for body in (data + b"\0" * 600, data[:-1])] == [403, 403]
    assert put(ticket.json()["upload_url"], data) == 200
    created = api.post("/jobs", json=job(url))
    assert created.status_code == 201, created.text
    sheet = api.get(f"/jobs/{created.json()['id']}/sheet").json()
    assert {row["plan"] for row in sheet["rows"]} == {"Ground-floor"}  # the user's name, not the upload's id
    for name, stem in [("..\\..\\a b.png", "a-b"), ("/etc/passwd.png", "passwd"), ("x/.hidden.jpg", "hidden")]:
        key = api.post("/uploads", json={"name": name, "size": 10}).json()["url"].split("/uploads/", 1)[1]
        assert re.fullmatch(rf"[0-9a-f-]{{36}}/{stem}\.(png|jpg)", key), (name, key)
    for body, expected in [
        ({"name": "tool.exe", "size": 10}, "uploads take .png"),
        ({"name": "plan.png", "size": 64 * 2**20 + 1}, "over this farm's limit of 67108864"),
        ({"name": "plan.png", "size": 0}, "size: should be greater than or equal to 1"),
        ({"name": "plan.png", "size": "10"}, "size: should be a valid integer"),
        ({"name": "plan.png"}, "size: required"),
    ]:
        refused = api.post("/uploads", json=body)
        assert refused.status_code == 422 and expected in refused.json()["detail"], refused.text


def test_a_plan_over_the_size_limit_is_refused_by_its_size_without_being_read(
    farm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_server, s3_bucket: str, example_plan: Path
) -> None:
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="plans/huge.png", Body=b"\0" * (40 * 2**20))
    client.put_object(Bucket=s3_bucket, Key="plans/small.png", Body=example_plan.read_bytes())
    storages = Storages(Settings(s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region))
    storages.read(f"s3://{s3_bucket}/plans/small.png")  # the S3 client is made and cached before measuring
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="larger than the limit of 1048576 bytes"):
            storages.read(f"s3://{s3_bucket}/plans/huge.png", max_bytes=2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak} bytes allocated to refuse a 40 MiB object"
    with TestClient(create_app(Settings(max_plan_bytes=2**20))) as api:
        refused = api.post("/jobs", json=job(f"s3://{s3_bucket}/plans/huge.png"))
        assert refused.status_code == 422
        assert refused.json()["detail"].endswith(": not a readable image of at most 1 MiB")
        assert api.post("/jobs", json=job(f"s3://{s3_bucket}/plans/small.png")).status_code == 201


def test_no_id_cursor_offset_or_row_reaches_the_database_unchecked(api: TestClient, s3_plan: str) -> None:
    job_id = api.post("/jobs", json=job(s3_plan)).json()["id"]
    past = str(2**64)
    answers = {
        "/jobs/a%00b/sheet": 404,
        "/ui/jobs/a%00b?fragment=sheet": 404,
        "/ui/jobs/a%00b": 404,
        "/jobs?cursor=a%00b": 422,
        f"/?offset={past}": 422,
        f"/ui/jobs/{job_id}?row={past}": 422,
        f"/ui/jobs/{job_id}?fragment=sheet&seed={past}": 422,
        f"/jobs/{job_id}/sheet?row={past}": 422,
        f"/jobs/{job_id}/results?cursor={past}": 422,
        f"/jobs/{job_id}/results?cursor={2**63}": 422,
        f"/jobs/{job_id}/results?cursor={MAX_ROW_ID}": 422,  # a valid id that names no image of the job
        f"/jobs/{job_id}/plans/{'0' * 64}": 404,
        f"/jobs/{job_id}/plans/..%2F..%2Fetc%2Fpasswd": 404,
        f"/artifacts/{2**63}": 422,
    }
    for path, status in answers.items():
        response = api.get(path)
        assert response.status_code == status, (path, response.text[:300])
        assert "\x00" not in response.text and past not in response.text.replace(f"got '{past}'", "")
    # The largest offsets accepted are answered with empty pages.
    assert api.get(f"/jobs/{job_id}/sheet", params={"row": MAX_OFFSET, "seed": MAX_OFFSET}).json()["rows"] == []
    assert 'data-job="' not in api.get("/", params={"offset": MAX_OFFSET}).text


def test_priority_takes_an_integer_from_0_to_100_and_nothing_else(api: TestClient, s3_plan: str) -> None:
    job_id = api.post("/jobs", json=job(s3_plan)).json()["id"]
    for body in ({"priority": True}, {"priority": "90"}, {"priority": 90.0}, {"priority": 101}, {"priority": None}, {}):
        refused = api.post(f"/jobs/{job_id}/priority", json=body)
        assert refused.status_code == 422 and refused.json()["detail"].startswith("body.priority: "), body
    refused = api.post(f"/jobs/{job_id}/priority", json={"priority": 90, "urgent": True})
    assert refused.status_code == 422 and "body.urgent: unknown field" in refused.json()["detail"]
    assert api.get(f"/jobs/{job_id}").json()["priority"] == 50
    changed = api.post(f"/jobs/{job_id}/priority", json={"priority": 90})
    assert changed.status_code == 200 and changed.json()["priority"] == 90 and changed.json()["sent"] == 4


def test_a_pick_takes_draft_ids_of_a_staged_job_and_nothing_else(api: TestClient, s3_plan: str) -> None:
    """Bad picks are refused before anything changes: not a staged job, ids that are no drafts of this job (also
    past 2⁶³), an empty pick; nothing is queued by them."""
    plain = api.post("/jobs", json=job(s3_plan)).json()["id"]
    refused = api.post(f"/jobs/{plain}/pick", json={"artifacts": [1]})
    assert refused.status_code == 422 and "it has no stages" in refused.json()["detail"]
    stages = {"draft": {"steps": 1}, "pick": {"by": "hand"}, "final": {"scale": 2}}
    staged = api.post("/jobs", json=job(s3_plan, **stages)).json()
    assert staged["pick_gate"] == "open" and staged["total"] == 4
    for body, message in (
        ({"artifacts": [2**63]}, "body.artifacts.0: "),
        ({"artifacts": ["1"]}, "body.artifacts.0: "),
        ({}, "name drafts to pick"),
        ({"artifacts": [1]}, "has no finished draft 1"),  # no draft has rendered: no worker runs
        ({"artifacts": [1], "now": True}, "body.now: unknown field"),
    ):
        answer = api.post(f"/jobs/{staged['id']}/pick", json=body)
        assert answer.status_code == 422 and message in answer.json()["detail"], (body, answer.json())
    assert api.get(f"/jobs/{staged['id']}").json()["total"] == 4  # no final was added
    closed = api.post(f"/jobs/{staged['id']}/pick", json={"done": True})
    assert closed.status_code == 200 and closed.json()["pick_gate"] == "closed" and closed.json()["finals"] == []


def test_a_plan_is_served_by_its_digest_from_where_its_tasks_read_it(
    api: TestClient, s3_plan: str, s3_server, s3_bucket: str, example_plan: Path
) -> None:
    job_id = api.post("/jobs", json=job(s3_plan)).json()["id"]
    digest = api.get(f"/jobs/{job_id}/sheet").json()["rows"][0]["plan_digest"]
    preview = api.get(f"/jobs/{job_id}/plans/{digest}")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
    assert "immutable" in preview.headers["cache-control"]
    assert max(Image.open(io.BytesIO(preview.content)).size) == 256
    assert f'src="/jobs/{job_id}/plans/{digest}"' in api.get(f"/ui/jobs/{job_id}").text  # beside its sheet rows
    assert api.get(f"/jobs/{job_id}/plans/{'f' * 64}").status_code == 404  # no plan of this job
    # A plan overwritten since: its digest no longer holds, and nothing else is shown under it.
    flipped = io.BytesIO()
    Image.open(example_plan).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, format="PNG")
    s3_server.client().put_object(Bucket=s3_bucket, Key="plans/ground.png", Body=flipped.getvalue())
    changed = api.get(f"/jobs/{job_id}/plans/{digest}")
    assert changed.status_code == 404 and "changed since the job was submitted" in changed.json()["detail"]


def test_failures_are_grouped_and_blocklisted_workers_said_as_such_everywhere(
    api: TestClient, s3_plan: str, s3_server, s3_bucket: str, example_plan: Path, farm_env: dict[str, str]
) -> None:
    flipped = io.BytesIO()
    Image.open(example_plan).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, format="PNG")
    s3_server.client().put_object(Bucket=s3_bucket, Key="plans/first.png", Body=flipped.getvalue())
    created = api.post("/jobs", json=job(s3_plan, plans=[s3_plan, f"s3://{s3_bucket}/plans/first.png"]))
    job_id = created.json()["id"]
    farm = api.app.state.farm  # type: ignore[attr-defined]
    reasons = {"ground": ["plan unreadable"] * 3, "first": ["out of memory", "out of memory", "lost device"]}
    queue = farm_env["ARCHFARM_QUEUE"]
    with farm.sessions.begin() as session:  # what workers record as the tasks run and fail
        tasks = session.execute(select(Task).where(Task.job_id == job_id).order_by(Task.ordinal)).scalars().all()
        # One task of `ground` rendered by a worker since stopped: that plan renders, the nodes are at fault.
        done = tasks[0]
        register_worker(session, "gpu-c#1", "gpu-c", "cpu", 1, [queue])
        session.execute(update(Worker).where(Worker.id == "gpu-c#1").values(stopped_at=func.now()))
        session.execute(update(Task).where(Task.id == done.id).values(status=TaskStatus.SUCCEEDED, worker="gpu-c#1"))
        session.add(
            Artifact(
                job_id=job_id,
                task_id=done.id,
                plan_digest=done.plan_digest,
                style=done.style,
                seed=done.seeds[0],
                url=f"s3://{s3_bucket}/renders/x.png",
                sidecar_url=f"s3://{s3_bucket}/renders/x.json",
                width=64,
                height=64,
                size_bytes=1,
            )
        )
        failing = [(task.id, reasons[task.plan_name].pop()) for task in tasks[1:] if reasons[task.plan_name]]
        for task_id, reason in failing:
            session.execute(update(Task).where(Task.id == task_id).values(status=TaskStatus.FAILED, error=reason))
        for node in ("gpu-a", "gpu-b"):  # two live workers of the job's pool, each failing three tasks of `ground`
            register_worker(session, f"{node}#1", node, "cpu", 1, [queue])
            for task_id, reason in failing[:3]:
                record_failure(session, task_id, job_id, node, "error", reason)
    groups = [
        {"plan": "ground", "error": "plan unreadable", "count": 3},
        {"plan": "first", "error": "out of memory", "count": 2},
        {"plan": "first", "error": "lost device", "count": 1},
    ]
    view = api.get(f"/jobs/{job_id}").json()
    assert view["failure_groups"] == groups and len(view["failures"]) == 6
    assert (view["workers"], view["workers_live"]) == (0, 2)
    cli_view = json.loads(CliRunner().invoke(cli, ["status", job_id, "--json"]).stdout)
    assert cli_view["failure_groups"] == groups and cli_view["workers_live"] == 2
    page = api.get(f"/ui/jobs/{job_id}").text
    assert "0 of 2 live workers may take it: 2 blocklisted for this job" in page
    failures = page[page.index("Contact sheet") :]  # below the sheet
    rows = re.findall(
        r"<tr><td>(\w+)</td><td class=\"reason\">([\w ]+)</td><td class=\"num\">(\d+)</td></tr>", failures
    )
    assert rows == [(g["plan"], g["error"], str(g["count"])) for g in groups]
    assert "6 failed tasks by plan and reason" in failures
    with farm.sessions.begin() as session:  # the last task fails too: the job has ended, partly failed
        session.execute(
            update(Task)
            .where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED)
            .values(status=TaskStatus.FAILED, error="lost device")
        )
    summary = api.get(f"/ui/jobs/{job_id}", params={"fragment": "summary"}).text
    assert "partially succeeded" in summary
    assert "1/8 ok · 7 failed" in summary and "100%" not in summary
    assert "1/8 ok · 7 failed" in api.get("/", params={"fragment": "jobs"}).text


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
    refs = {"render": "#/components/schemas/JobSpec", "train": "#/components/schemas/TrainingSpec"}
    assert body == {
        "oneOf": [{"$ref": ref} for ref in refs.values()],
        "discriminator": {"propertyName": "kind", "mapping": refs},
    }
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


def test_a_deadline_at_risk_shows_everywhere_and_a_spent_quota_refuses_the_next_job(
    farm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_plan: str
) -> None:
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ARCHFARM_QUOTAS", '{"": 50}')  # the owner of jobs sent without a token
    settings = Settings()
    soon = datetime.now(UTC) + timedelta(minutes=5)
    with TestClient(create_app(settings)) as api:
        job_id = api.post("/jobs", json=job(s3_plan, deadline=soon.isoformat())).json()["id"]
        view = api.get(f"/jobs/{job_id}").json()
        assert view["deadline_at"] and view["expected_at"] is None and not view["at_risk"]  # no worker: no forecast
        sessions = session_factory(make_engine(settings.database_url))
        with sessions.begin() as session:
            digest = Profile.model_validate(session.get_one(Job, job_id).spec["profile"]).digest()
            record_cost(session, digest, "cpu", 100.0)  # 4 tasks, 400 s on the one worker: past the 5 minutes
            register_worker(session, "w#1", "w", "cpu", 1, [settings.queue])
        view = api.get(f"/jobs/{job_id}").json()
        assert view["at_risk"] and datetime.fromisoformat(view["expected_at"]) > soon
        assert "at risk" in api.get(f"/ui/jobs/{job_id}").text
        assert "AT RISK" in CliRunner().invoke(cli, ["status", job_id]).output
        with sessions.begin() as session:
            for task_id in session.scalars(select(Task.id).where(Task.job_id == job_id)).all():
                assert claim_task(session, task_id, "w#1") and finish_task(session, task_id, "w#1")
        refused = api.post("/jobs", json=job(s3_plan))
    assert refused.status_code == 429
    assert "'(local)' has used 400 of its 50 GPU-seconds of the last 24 hours" in refused.json()["detail"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1  # nothing stored
