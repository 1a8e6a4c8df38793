"""The REST API: submit, watch, control and fetch results over HTTP; and the dashboard (`/`).

A remote caller must not make the farm read or write its own files: plans, control images and outputs must
be s3:// URLs under the allowed prefixes, model folders absolute paths under the allowed roots, and
notification URLs under the allowed ones (`producer.remote`). Who calls, and what a browser may make it do, is
`producer.auth`'s.
Images are served by their artifact id alone, read from where the farm recorded them, so no caller can name
a storage key. Errors are RFC 9457 problem documents with one-line messages, as in the CLI (a page of the
dashboard answers with a page).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer import auth, dashboard, schemas
from producer.client import Farm, Part
from producer.metrics import FarmCollector
from producer.remote import check_remote
from producer.schemas import problem
from producer.views import ArtifactView, JobView, WorkerView
from shared.config import Settings
from shared.db.tokens import Caller
from shared.errors import (
    ArchfarmError,
    ConfigError,
    Forbidden,
    InvalidInput,
    NotFound,
    PlanError,
    TransientError,
    Unauthenticated,
)
from shared.kinds import SPECS, parse_spec
from shared.plans import safe_stem
from shared.spec import MAX_ECHO, describe_errors
from shared.thumbnails import CONTENT_TYPE

UPLOAD_SECONDS = 3600
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
_STATUS: dict[type[ArchfarmError], int] = {
    InvalidInput: 422,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    ConfigError: 503,
    TransientError: 503,
}
OPEN_PATHS = auth.OPEN_PATHS
Digest = Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$", description="a plan's SHA-256, as its tasks carry it")]


def create_app(settings: Settings | None = None, listen_host: str = "127.0.0.1") -> FastAPI:
    """The API for a farm. Tokens are required per `ARCHFARM_API_AUTH` (`producer.auth.Gate`): `auto` requires
    them when `listen_host` is not a loopback address, or once any token exists."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.farm = Farm(settings)
        yield
        app.state.farm.close()

    app = FastAPI(title="archfarm", version=version("archfarm"), lifespan=lifespan, responses=schemas.ERRORS)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    auth.install(app, settings, listen_host)

    @app.exception_handler(ArchfarmError)
    async def refused(request: Request, error: ArchfarmError) -> Response:
        """Status by the kind of error (`shared.errors`), never by its text."""
        status = next((_STATUS[kind] for kind in type(error).__mro__ if kind in _STATUS), 500)
        if dashboard.is_page(request):
            return dashboard.error_page(str(error), status)
        return problem(status, str(error))

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        """A malformed query or body answers like an invalid job: one shape for every 4xx."""
        return problem(422, describe_errors(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return problem(error.status_code, str(error.detail), dict(error.headers or {}))

    def farm(request: Request) -> Farm:
        farm: Farm = request.app.state.farm
        return farm

    registry = CollectorRegistry()
    registry.register(FarmCollector(lambda: app.state.farm))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus' text format, answered at /metrics itself (a mounted app redirects to /metrics/)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process answers (a liveness probe)."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        """The database, the broker and the storage answer (a readiness probe): 503 with what is down otherwise.
        Why it is down names hosts and ports, so only a token's holder is told; anyone else reads `down`."""
        checks = farm(request).readiness()
        if request.state.caller is None:
            checks = {name: state if state == "ok" else "down" for name, state in checks.items()}
        down = [f"{name}: {state}" for name, state in checks.items() if state != "ok"]
        if down:
            return problem(503, "; ".join(down))
        return JSONResponse({"status": "ok", **checks})

    @app.post("/jobs", status_code=201)
    def submit(request: Request, response: Response, job: dict[str, Any] = Body(...)) -> JobView:  # noqa: B008
        client = farm(request)
        if client.settings.broker_url is None:
            raise ConfigError("no broker configured: the API only queues work for workers")
        spec = parse_spec(job)
        check_remote(spec, client.settings)
        owner = None if request.state.caller is None else request.state.caller.name
        try:
            job_id = client.submit(spec, owner=owner, remote=True)
        except PlanError as error:  # one answer for missing, forbidden, too large and not-an-image alike
            limit = f"{client.settings.max_plan_bytes / 2**20:g} MiB"
            raise InvalidInput(f"{error.url[:MAX_ECHO]!r}: not a readable image of at most {limit}") from None
        response.headers["Location"] = f"/jobs/{job_id}"
        return client.status(job_id)

    @app.post("/uploads", status_code=201, response_model=schemas.Upload)
    def upload(request: Request, body: schemas.UploadRequest) -> dict[str, Any]:
        """Where to PUT a plan or control image without storage credentials: a presigned PUT URL (valid
        `UPLOAD_SECONDS`) for exactly `size` bytes (the signature covers the Content-Length, so S3 itself refuses
        any other size), and the s3:// URL to name in a job. Each upload gets a folder of its own, holding the
        file under its own name, made safe: the plan keeps that name in keys, sheets and results."""
        client = farm(request)
        storage = client.storages.open()
        if not storage.presigns:
            raise ConfigError("uploads need the farm's storage on S3 (ARCHFARM_STORAGE_URL=s3://...)")
        name = PurePosixPath(body.name.replace("\\", "/")).name
        suffix = PurePosixPath(name).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise InvalidInput(f"name: {body.name[:MAX_ECHO]!r}: uploads take {', '.join(UPLOAD_SUFFIXES)} files")
        if body.size > client.settings.max_plan_bytes:
            raise InvalidInput(f"size: {body.size} bytes is over this farm's limit of {client.settings.max_plan_bytes}")
        key = f"uploads/{uuid.uuid4()}/{safe_stem(PurePosixPath(name).stem)}{suffix}"
        put = storage.presigned_url(key, UPLOAD_SECONDS, method="put_object", content_length=body.size)
        return {
            "url": storage.url(key),
            "upload_url": put,
            "method": "PUT",
            "size": body.size,
            "expires_in": UPLOAD_SECONDS,
        }

    @app.get("/jobs")
    def jobs(
        request: Request,
        response: Response,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        status: str | None = None,
        cursor: Annotated[str | None, Query(max_length=36)] = None,
    ) -> list[JobView]:
        """Recent jobs, newest first; `status` keeps the jobs in that status. A full page links the next one
        (`Link: <...>; rel="next"`), whose `cursor` is the last job of this one: pages stay steady while jobs
        are added."""
        views = farm(request).jobs(limit=limit, status=dashboard.job_status(status), after=cursor)
        if len(views) == limit:
            _link_next(request, response, views[-1].id)
        return views

    @app.get("/jobs/{job_id}")
    def status(request: Request, job_id: str) -> JobView:
        return farm(request).status(job_id)

    def change(request: Request, job_id: str, act: Callable[[Farm], object]) -> dict[str, Any]:
        """A change to a job by its owner (or an admin): the job as it is now, with what the change returned
        as `sent` (kept by the routes whose answer says how many tasks were sent)."""
        client = farm(request)
        owned(request, job_id)
        result = act(client)
        return {**client.status(job_id).model_dump(), "sent": result}

    @app.post("/jobs/{job_id}/cancel", response_model=JobView)
    def cancel(request: Request, job_id: str) -> dict[str, Any]:
        return change(request, job_id, lambda client: client.cancel(job_id))

    @app.post("/jobs/{job_id}/retry", response_model=schemas.JobAction)
    def retry(request: Request, job_id: str) -> dict[str, Any]:
        return change(request, job_id, lambda client: client.retry(job_id))

    @app.post("/jobs/{job_id}/pause", response_model=JobView)
    def pause(request: Request, job_id: str) -> dict[str, Any]:
        return change(request, job_id, lambda client: client.pause(job_id))

    @app.post("/jobs/{job_id}/resume", response_model=schemas.JobAction)
    def resume(request: Request, job_id: str) -> dict[str, Any]:
        return change(request, job_id, lambda client: client.resume(job_id))

    @app.post("/jobs/{job_id}/priority", response_model=schemas.JobAction)
    def priority(request: Request, job_id: str, body: schemas.Priority) -> dict[str, Any]:
        return change(request, job_id, lambda client: client.set_priority(job_id, body.priority))

    @app.get("/workers")
    def workers(request: Request) -> list[WorkerView]:
        return farm(request).workers()

    @app.get("/jobs/{job_id}/results", response_model=schemas.Results)
    def results(
        request: Request,
        job_id: str,
        response: Response,
        limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
        cursor: Annotated[int | None, Query(ge=1, le=dashboard.MAX_ROW_ID)] = None,
    ) -> dict[str, Any]:
        """Artifacts (all, or a page of `limit`, linking the next as `Link: <...>; rel="next"` whose `cursor` is
        this page's last image) with pre-signed download links where the output is on S3."""
        client = farm(request)
        view = client.status(job_id)
        # Links are signed for ARCHFARM_S3_PUBLIC_ENDPOINT_URL: the caller may reach S3 at another address.
        storage = client.storages.open(view.output_url)
        prefix = view.output_url.rstrip("/") + "/"
        artifacts = []
        page = client.results(job_id, limit=limit, after=cursor)
        if limit is not None and len(page) == limit:
            _link_next(request, response, str(page[-1].id))
        for artifact in page:
            if storage.presigns:
                link = storage.presigned_url(artifact.url.removeprefix(prefix))
                artifact = artifact.model_copy(update={"download_url": link})
            artifacts.append(artifact)
        return {"job": job_id, "status": view.status.value, "artifacts": artifacts}

    @app.get("/jobs/{job_id}/sheet")
    def sheet(
        request: Request,
        job_id: str,
        row: dashboard.Offset = 0,
        rows: dashboard.SheetRows = dashboard.SHEET_ROWS,
        seed: dashboard.Offset = 0,
        seeds: dashboard.SheetSeeds = dashboard.SHEET_SEEDS,
    ) -> dict[str, Any]:
        """A page of the contact sheet: plan × style rows, seed columns, each cell's image id or task state."""
        return farm(request).sheet(job_id, row_offset=row, rows=rows, seed_offset=seed, seeds=seeds).to_dict()

    @app.get("/jobs/{job_id}/plans/{digest}", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    def plan(request: Request, job_id: str, digest: Digest) -> Response:
        """A preview (JPEG) of one of the job's plans, by its content hash: read from where the job's tasks
        read it, never from a location the caller names."""
        headers = {"Cache-Control": "private, max-age=86400, immutable"}  # named by content: never another image
        return Response(farm(request).plan(job_id, digest), media_type=CONTENT_TYPE, headers=headers)

    @app.get("/artifacts/{artifact_id}")
    def artifact(request: Request, artifact_id: dashboard.ArtifactId) -> ArtifactView:
        return farm(request).artifact(artifact_id)

    @app.get("/artifacts/{artifact_id}/image")
    def image(request: Request, artifact_id: dashboard.ArtifactId, download: bool = False) -> Response:
        """The PNG; `download=true` asks the browser to save it under a name that says what it is."""
        view = farm(request).artifact(artifact_id)
        headers = {"Content-Disposition": f'attachment; filename="{download_name(view)}"'} if download else {}
        return stored(request, view, "image", "image/png", headers)

    @app.get("/artifacts/{artifact_id}/thumbnail")
    def thumbnail(request: Request, artifact_id: dashboard.ArtifactId) -> Response:
        return stored(request, farm(request).artifact(artifact_id), "thumbnail", CONTENT_TYPE)

    @app.get("/artifacts/{artifact_id}/sidecar")
    def sidecar(request: Request, artifact_id: dashboard.ArtifactId) -> Response:
        return stored(request, farm(request).artifact(artifact_id), "sidecar", "application/json")

    def stored(
        request: Request, view: ArtifactView, part: Part, media_type: str, headers: dict[str, str] | None = None
    ) -> Response:
        # An artifact's objects are rewritten only with the same inputs: a browser may keep them a while.
        headers = {"Cache-Control": "private, max-age=3600", **(headers or {})}
        return Response(farm(request).read(view, part), media_type=media_type, headers=headers)

    app.include_router(dashboard.router)
    app.mount("/static", dashboard.STATIC, name="static")
    return app


def download_name(view: ArtifactView) -> str:
    """`floorplan_modern_seed-3_ab12cd34ef56.png`: plan, style and the image's own file name."""
    name = f"{view.plan}_{view.style}_{view.url.rsplit('/', 1)[-1]}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, made to say what the API does: POST /jobs takes a spec of any kind, told apart by its
    `kind` (render when it names none; its handler reads the body itself, for archfarm's one-line errors and
    size checks), and every error answer is a problem document (FastAPI's own validation shape is never sent:
    see `malformed`)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = document.setdefault("components", {}).setdefault("schemas", {})
        refs = {}
        for kind, model in SPECS.items():
            spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(spec.pop("$defs", {}))
            components[model.__name__] = spec
            refs[kind.value] = f"#/components/schemas/{model.__name__}"
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        union = {
            "oneOf": [{"$ref": ref} for ref in refs.values()],
            "discriminator": {"propertyName": "kind", "mapping": refs},
        }
        body = {"application/json": {"schema": union}}
        document["paths"]["/jobs"]["post"]["requestBody"] = {"required": True, "content": body}
        problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for path in document["paths"].values():
            for operation in path.values():
                for status, answer in operation.get("responses", {}).items():
                    if int(status) >= 400:
                        answer["content"] = problem
        app.openapi_schema = document
    return app.openapi_schema


def _link_next(request: Request, response: Response, cursor: str) -> None:
    """The next page's URL in a `Link` header (RFC 8288): this request's, with `cursor` set."""
    next_page = request.url.include_query_params(cursor=cursor)
    response.headers["Link"] = f'<{next_page.path}?{next_page.query}>; rel="next"'


def owned(request: Request, job_id: str) -> None:
    """Refuse a change to another owner's job: an admin token may change any, any token its own, and
    without a token (the API not requiring one) there is no owner to tell apart."""
    caller: Caller | None = request.state.caller
    if caller is None or caller.admin:
        return
    owner = request.app.state.farm.status(job_id).owner
    if owner != caller.name:
        holder = repr(owner) if owner else "the farm's operator"
        raise Forbidden(f"job {job_id} belongs to {holder}, not to {caller.name!r}")
