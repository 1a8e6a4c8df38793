"""API tokens and job owners against the real services: every route refuses a missing, wrong or revoked token
(401, never 500, never success), a user changes only its own jobs (403 otherwise), an admin any."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount
from typer.testing import CliRunner

from producer.api import OPEN_PATHS, create_app
from producer.cli import app as cli
from producer.client import Farm
from shared.config import Settings
from shared.db.tokens import create_token, revoke_token

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.s3]

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}
SOME_JOB = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def tokens(farm: Farm) -> dict[str, str]:
    with farm.sessions.begin() as session:
        made = {name: create_token(session, name, admin=name == "ops") for name in ("alice", "bob", "ops", "gone")}
        revoke_token(session, "gone")
    return made


@pytest.fixture
def api(farm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings(api_auth="on"))) as client:
        yield client


@pytest.fixture
def s3_plan(s3_server, s3_bucket: str, example_plan: Path) -> str:  # type: ignore[no-untyped-def]
    s3_server.client().put_object(Bucket=s3_bucket, Key="plans/ground.png", Body=example_plan.read_bytes())
    return f"s3://{s3_bucket}/plans/ground.png"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def job(plan: str) -> dict:
    return {"name": "auth", "plans": [plan], "styles": ["modern"], "seeds": [1], "profile": PROFILE}


def every_route(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every route and mount, with a job id where the path takes one."""
    found: list[tuple[str, str]] = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, APIRoute):
            path = route.path.replace("{job_id}", SOME_JOB).replace("{artifact_id}", "1")
            found += [(method, path) for method in sorted(route.methods - {"HEAD"})]
        elif isinstance(route, Mount):
            found.append(("GET", route.path))
    return [(method, path) for method, path in found if path not in OPEN_PATHS and not path.startswith("/docs")]


def test_every_route_refuses_a_missing_wrong_or_revoked_token(api: TestClient, tokens: dict[str, str]) -> None:
    routes = every_route(api)
    assert ("POST", "/jobs") in routes and ("GET", "/metrics") in routes
    for headers in ({}, bearer("af_not-a-token"), bearer(tokens["gone"]), {"Authorization": tokens["alice"]}):
        for method, path in routes:
            response = api.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    for path in OPEN_PATHS:
        assert api.get(path).status_code in (200, 503)
    assert api.get("/openapi.json").status_code == 401
    for page in ("/", "/ui/workers", f"/ui/jobs/{SOME_JOB}", "/ui/artifacts/1"):  # the dashboard: sign in first
        response = api.get(page, headers=bearer("af_not-a-token"), follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/ui/login?next=")


def test_a_user_changes_only_its_own_jobs_and_an_admin_any(
    api: TestClient, tokens: dict[str, str], s3_plan: str
) -> None:
    created = api.post("/jobs", json=job(s3_plan), headers=bearer(tokens["alice"]))
    assert created.status_code == 201 and created.json()["owner"] == "alice"
    job_id = created.json()["id"]
    assert api.get(f"/jobs/{job_id}", headers=bearer(tokens["bob"])).status_code == 200  # everyone sees
    for action in ("pause", "resume", "retry", "cancel"):
        refused = api.post(f"/jobs/{job_id}/{action}", headers=bearer(tokens["bob"]))
        assert refused.status_code == 403 and "belongs to 'alice', not to 'bob'" in refused.json()["detail"]
    assert api.post(f"/jobs/{job_id}/priority", json={"priority": 90}, headers=bearer(tokens["bob"])).status_code == 403
    assert api.post(f"/jobs/{job_id}/pause", headers=bearer(tokens["alice"])).status_code == 200
    assert api.post(f"/jobs/{job_id}/cancel", headers=bearer(tokens["ops"])).json()["status"] == "cancelled"


def test_tokens_are_required_beyond_loopback_unless_configured(farm_env: dict[str, str], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    for host, auth, status in [
        ("0.0.0.0", "auto", 401),
        ("127.0.0.1", "auto", 200),
        ("::1", "auto", 200),
        ("0.0.0.0", "off", 200),
    ]:
        with TestClient(create_app(Settings(api_auth=auth), listen_host=host)) as client:  # type: ignore[arg-type]
            assert client.get("/jobs").status_code == status, (host, auth)


def test_token_commands(farm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, farm: Farm) -> None:
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    created = runner.invoke(cli, ["token", "create", "pipeline", "--admin"])
    assert created.exit_code == 0 and created.stdout.startswith("af_")
    assert farm.caller(created.stdout.strip()).admin  # type: ignore[union-attr]
    assert runner.invoke(cli, ["token", "create", "pipeline"]).exit_code == 2  # names are unique
    listed = runner.invoke(cli, ["token", "list"]).stdout
    assert "pipeline  admin  created " in listed and created.stdout.strip() not in listed
    assert runner.invoke(cli, ["token", "revoke", "pipeline"]).exit_code == 0
    assert farm.caller(created.stdout.strip()) is None
    assert "revoked" in runner.invoke(cli, ["token", "list"]).stdout
