"""The REST API: submit, watch, cancel, retry and fetch results over HTTP; and the dashboard (`/`).

Plans and outputs must be s3:// URLs here: a remote caller must not make the farm read or write files on
its own machines. Images are served by their artifact id alone, read from where the farm recorded them, so
no caller can name a storage key. Errors are JSON `{"detail": "..."}` with one-line messages, as in the CLI
(a page of the dashboard answers with a page).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from producer import dashboard
from producer.client import ArtifactView, Farm, Part
from shared.config import Settings
from shared.errors import ArchfarmError, ConfigError, InvalidInput, NotFound, TransientError
from shared.spec import ImageControl, JobSpec, parse_model
from shared.storage import S3Storage, open_storage
from shared.thumbnails import CONTENT_TYPE

_STATUS: dict[type[ArchfarmError], int] = {InvalidInput: 422, NotFound: 404, ConfigError: 503, TransientError: 503}


def create_app(settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.farm = Farm(settings or Settings())
        yield
        app.state.farm.close()

    app = FastAPI(title="archfarm", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ArchfarmError)
    async def refused(request: Request, error: ArchfarmError) -> Response:
        """Status by the kind of error (`shared.errors`), never by its text."""
        status = next((_STATUS[kind] for kind in type(error).__mro__ if kind in _STATUS), 500)
        if dashboard.is_page(request):
            return dashboard.error_page(str(error), status)
        return JSONResponse({"detail": str(error)}, status_code=status)

    def farm(request: Request) -> Farm:
        farm: Farm = request.app.state.farm
        return farm

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/jobs", status_code=201)
    def submit(request: Request, job: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        client = farm(request)
        if client.settings.broker_url is None:
            raise ConfigError("no broker configured: the API only queues work for workers")
        spec = parse_model(JobSpec, job)
        remote_only(spec)
        job_id = client.submit(spec)
        return client.status(job_id).to_dict()

    @app.get("/jobs")
    def jobs(
        request: Request, limit: int = 50, offset: Annotated[int, Query(ge=0)] = 0, status: str | None = None
    ) -> list[dict[str, Any]]:
        """Recent jobs, newest first; `status` keeps the jobs in that status."""
        views = farm(request).jobs(limit=min(max(limit, 1), 500), offset=offset, status=dashboard.job_status(status))
        return [view.to_dict() for view in views]

    @app.get("/jobs/{job_id}")
    def status(request: Request, job_id: str) -> dict[str, Any]:
        return farm(request).status(job_id).to_dict()

    @app.post("/jobs/{job_id}/cancel")
    def cancel(request: Request, job_id: str) -> dict[str, Any]:
        client = farm(request)
        client.cancel(job_id)
        return client.status(job_id).to_dict()

    @app.post("/jobs/{job_id}/retry")
    def retry(request: Request, job_id: str) -> dict[str, Any]:
        client = farm(request)
        sent = client.retry(job_id)
        return {**client.status(job_id).to_dict(), "sent": sent}

    @app.post("/jobs/{job_id}/pause")
    def pause(request: Request, job_id: str) -> dict[str, Any]:
        client = farm(request)
        client.pause(job_id)
        return client.status(job_id).to_dict()

    @app.post("/jobs/{job_id}/resume")
    def resume(request: Request, job_id: str) -> dict[str, Any]:
        client = farm(request)
        sent = client.resume(job_id)
        return {**client.status(job_id).to_dict(), "sent": sent}

    @app.post("/jobs/{job_id}/priority")
    def priority(request: Request, job_id: str, priority: int = Body(..., embed=True)) -> dict[str, Any]:  # noqa: B008
        client = farm(request)
        sent = client.set_priority(job_id, priority)
        return {**client.status(job_id).to_dict(), "sent": sent}

    @app.get("/workers")
    def workers(request: Request) -> list[dict[str, Any]]:
        return [view.to_dict() for view in farm(request).workers()]

    @app.get("/jobs/{job_id}/results")
    def results(
        request: Request,
        job_id: str,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int | None, Query(ge=1)] = None,
    ) -> dict[str, Any]:
        """Artifacts (all, or `limit` from `offset`) with pre-signed download links where the output is on S3."""
        client = farm(request)
        view = client.status(job_id)
        # The links are for the caller, who may reach S3 at another address than the farm does.
        storage = open_storage(
            view.output_url,
            endpoint_url=client.settings.s3_endpoint_url,
            region=client.settings.s3_region,
            public_endpoint_url=client.settings.s3_public_endpoint_url,
        )
        prefix = view.output_url.rstrip("/") + "/"
        artifacts = []
        for artifact in client.results(job_id, offset=offset, limit=limit):
            item = artifact.to_dict()
            if isinstance(storage, S3Storage):
                item["download_url"] = storage.presigned_url(artifact.url.removeprefix(prefix))
            artifacts.append(item)
        return {"job": job_id, "status": view.status.value, "artifacts": artifacts}

    @app.get("/jobs/{job_id}/sheet")
    def sheet(
        request: Request,
        job_id: str,
        row: Annotated[int, Query(ge=0)] = 0,
        rows: dashboard.SheetRows = dashboard.SHEET_ROWS,
        seed: Annotated[int, Query(ge=0)] = 0,
        seeds: dashboard.SheetSeeds = dashboard.SHEET_SEEDS,
    ) -> dict[str, Any]:
        """A page of the contact sheet: plan × style rows, seed columns, each cell's image id or task state."""
        return farm(request).sheet(job_id, row_offset=row, rows=rows, seed_offset=seed, seeds=seeds).to_dict()

    @app.get("/artifacts/{artifact_id}")
    def artifact(request: Request, artifact_id: dashboard.ArtifactId) -> dict[str, Any]:
        return farm(request).artifact(artifact_id).to_dict()

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


def remote_only(spec: JobSpec) -> None:
    """Refuse local paths from remote callers: they would read or write files on the farm's machines."""
    for plan in spec.plans:
        if not plan.startswith("s3://"):
            raise InvalidInput(f"plans: {plan!r}: the API takes s3:// URLs only")
    if spec.output is not None and not spec.output.startswith("s3://"):
        raise InvalidInput(f"output: {spec.output!r}: the API takes s3:// URLs only")
    for index, unit in enumerate(spec.profile.controls):
        if isinstance(unit, ImageControl) and not unit.image.startswith("s3://"):
            raise InvalidInput(f"profile.controls.{index}.image: {unit.image!r}: the API takes s3:// URLs only")
