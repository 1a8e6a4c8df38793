"""The REST API: submit, watch, cancel, retry and fetch results over HTTP.

Plans and outputs must be s3:// URLs here: a remote caller must not make the farm read or write files on
its own machines. Errors are JSON `{"detail": "..."}` with one-line messages, as in the CLI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse

from producer.client import Farm
from shared.config import Settings
from shared.errors import ArchfarmError, ConfigError, InvalidInput, NotFound, TransientError
from shared.spec import ImageControl, JobSpec, parse_model
from shared.storage import S3Storage, open_storage

_STATUS: dict[type[ArchfarmError], int] = {InvalidInput: 422, NotFound: 404, ConfigError: 503, TransientError: 503}


def create_app(settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.farm = Farm(settings or Settings())
        yield
        app.state.farm.close()

    app = FastAPI(title="archfarm", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(ArchfarmError)
    async def refused(_: Request, error: ArchfarmError) -> JSONResponse:
        """Status by the kind of error (`shared.errors`), never by its text."""
        status = next((_STATUS[kind] for kind in type(error).__mro__ if kind in _STATUS), 500)
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
    def jobs(request: Request, limit: int = 50) -> list[dict[str, Any]]:
        return [view.to_dict() for view in farm(request).jobs(limit=min(max(limit, 1), 500))]

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
    def results(request: Request, job_id: str) -> dict[str, Any]:
        """Artifacts with pre-signed download links where the output is on S3."""
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
        for artifact in client.results(job_id):
            item = artifact.to_dict()
            if isinstance(storage, S3Storage):
                item["download_url"] = storage.presigned_url(artifact.url.removeprefix(prefix))
            artifacts.append(item)
        return {"job": job_id, "status": view.status.value, "artifacts": artifacts}

    return app


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
