"""API tokens, dashboard sessions and job owners against the real services: every route refuses a missing, wrong
or revoked token (401, never 500, never success), a user changes only its own jobs (403 otherwise), an admin
any; a browser's request from another origin changes nothing, and no page of the farm can be framed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import update
from starlette.routing import Mount
from typer.testing import CliRunner

from producer.api import create_app
from producer.auth import FRAMING, OPEN_PATHS
from producer.cli import app as cli
from producer.client import Farm
from producer.dashboard import SESSION_COOKIE
from shared.config import Settings
from shared.db.clock import db_now
from shared.db.models import ApiSession
from shared.db.tokens import SESSION_SECONDS, create_token, revoke_token

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
    """(method, path) of every route and mount, those of included routers too (FastAPI keeps them as routers),
    with a job id where the path takes one."""
    found: list[tuple[str, str]] = []
    for route in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        if isinstance(route.original_route, APIRoute):
            path = route.path.replace("{job_id}", SOME_JOB).replace("{artifact_id}", "1").replace("{digest}", "a" * 64)
            found += [(method, path) for method in sorted(set(route.methods or ()) - {"HEAD"})]
        elif isinstance(route.original_route, Mount):
            found.append(("GET", route.path))
    # The dashboard's pages send a browser to sign in instead (checked apart, below).
    pages = [path for _, path in found if path == "/" or path.startswith("/ui/")]
    return [(m, path) for m, path in found if path not in OPEN_PATHS + tuple(pages) and not path.startswith("/docs")]


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


def test_auto_requires_a_token_on_loopback_too_once_one_exists(
    farm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, farm: Farm
) -> None:
    """Once the farm has owners, a local process is no operator by default: `auto` stops trusting loopback."""
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    with TestClient(create_app(Settings(api_auth="auto"), listen_host="127.0.0.1")) as client:
        assert client.get("/jobs").status_code == 200
        with farm.sessions.begin() as session:
            token = create_token(session, "alice", admin=False)
        assert client.get("/jobs").status_code == 401
        assert client.get("/jobs", headers=bearer(token)).status_code == 200
        with farm.sessions.begin() as session:
            revoke_token(session, "alice")
        assert client.get("/jobs").status_code == 401  # a revoked token still says the farm has owners
        assert client.get("/healthz").status_code == 200
    with TestClient(create_app(Settings(api_auth="off"), listen_host="127.0.0.1")) as client:
        assert client.get("/jobs").status_code == 200  # what an operator chooses explicitly


def sign_in(client: TestClient, token: str) -> str:
    """The dashboard's sign-in form, posted; the Set-Cookie header it answers."""
    answer = client.post("/ui/login", data={"token": token, "next": "/"}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    return answer.headers["set-cookie"]


def test_the_session_cookie_is_not_the_token_is_short_lived_and_ends_with_sign_out(
    api: TestClient, tokens: dict[str, str], farm: Farm
) -> None:
    cookie = sign_in(api, tokens["alice"])
    secret = api.cookies[SESSION_COOKIE]
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert tokens["alice"] not in cookie and secret.startswith("afs_")
    assert {"httponly", "samesite=strict", f"max-age={SESSION_SECONDS}", "path=/"} <= attributes
    assert "secure" not in attributes  # served over plain HTTP here: a Secure cookie would never come back
    assert api.get("/jobs").status_code == 200 and api.get("/").status_code == 200
    signed_out = api.post("/ui/logout", follow_redirects=False)
    assert signed_out.status_code == 303 and SESSION_COOKIE not in api.cookies
    replayed = {"Cookie": f"{SESSION_COOKIE}={secret}"}  # a copy kept from before is worth nothing now
    assert api.get("/jobs", headers=replayed).status_code == 401
    assert api.get("/", headers=replayed, follow_redirects=False).headers["location"].startswith("/ui/login")

    with TestClient(api.app, base_url="https://farm.example") as https:
        assert "secure" in {part.strip().lower() for part in sign_in(https, tokens["bob"]).split(";")}
    sign_in(api, tokens["bob"])
    assert api.get("/jobs").status_code == 200
    with farm.sessions.begin() as session:  # the session has lived its hours
        session.execute(update(ApiSession).values(expires_at=db_now(-1)))
    assert api.get("/jobs").status_code == 401
    sign_in(api, tokens["bob"])
    with farm.sessions.begin() as session:
        revoke_token(session, "bob")  # a revoked token's sessions end with it
    assert api.get("/jobs").status_code == 401
    failed = api.post("/ui/login", data={"token": tokens["gone"]}, follow_redirects=False)
    assert failed.headers["location"].startswith("/ui/login?") and "set-cookie" not in failed.headers


def test_a_browser_request_from_another_origin_changes_nothing(
    api: TestClient, tokens: dict[str, str], s3_plan: str
) -> None:
    """Same-site is not same-origin: a page on another port of the same host is refused like another site's."""
    job_id = api.post("/jobs", json=job(s3_plan), headers=bearer(tokens["alice"])).json()["id"]
    sign_in(api, tokens["alice"])
    foreign = [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://testserver:8001"},
        {"Origin": "http://testserver:8001"},  # a browser too old to send Sec-Fetch-Site
        {"Origin": "null"},
    ]
    for headers in foreign:
        for action in ("pause", "cancel", "retry", "resume"):
            refused = api.post(f"/jobs/{job_id}/{action}", headers=headers)
            assert refused.status_code == 403 and "another site or port" in refused.json()["detail"], headers
        assert api.post(f"/jobs/{job_id}/priority", json={"priority": 90}, headers=headers).status_code == 403
        assert api.post("/ui/logout", headers=headers).status_code == 403
        assert api.post("/ui/login", data={"token": tokens["bob"]}, headers=headers).status_code == 403
    view = api.get(f"/jobs/{job_id}").json()
    assert (view["status"], view["paused"], view["priority"]) == ("queued", False, 50)
    same = {"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"}
    assert api.post(f"/jobs/{job_id}/pause", headers=same).json()["paused"]
    assert api.post(f"/jobs/{job_id}/resume", headers={"Origin": "http://testserver"}).status_code == 200
    assert api.post(f"/jobs/{job_id}/cancel", headers=bearer(tokens["alice"])).json()["status"] == "cancelled"


def test_no_answer_may_be_framed(api: TestClient, tokens: dict[str, str]) -> None:
    answers = [
        api.get("/ui/login"),
        api.get("/", follow_redirects=False),
        api.get("/jobs"),
        api.get("/healthz"),
        api.get(f"/jobs/{SOME_JOB}", headers=bearer(tokens["alice"])),
        api.get("/", headers=bearer(tokens["alice"])),
        api.get("/static/dashboard.css"),
        api.post("/jobs/x/cancel", headers={"Sec-Fetch-Site": "cross-site"}),
    ]
    for answer in answers:
        assert {name: answer.headers.get(name) for name in FRAMING} == FRAMING, answer.request.url


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
