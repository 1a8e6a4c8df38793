"""The REST API: submit, watch, control and fetch results over HTTP; and the dashboard (`/`).

A remote caller must not make the farm read or write its own files: plans, control images and outputs must
be s3:// URLs under the allowed prefixes, model folders absolute paths under the allowed roots, and
notification URLs under the allowed ones (`producer.remote`). Who calls, and what a browser may make it do, is
`producer.auth`'s.
Images are served by their artifact id alone, read from where the farm recorded them, so no caller can name
a storage key. Errors are RFC 9457 problem documents with one-line messages, as in the CLI (a page of the
dashboard answers with a page). The routes are in routers by what they serve: `jobs`, `artifacts`, `uploads`,
`probes` (health, readiness, metrics, workers) and the dashboard's pages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer import auth, dashboard, schemas
from producer.api import artifacts, jobs, probes, uploads
from producer.client import Farm
from producer.metrics import FarmCollector
from producer.schemas import problem
from shared.config import Settings
from shared.errors import (
    ArchfarmError,
    ConfigError,
    Forbidden,
    InvalidInput,
    NotFound,
    QuotaSpent,
    TransientError,
    Unauthenticated,
)
from shared.kinds import SPECS
from shared.spec import describe_errors

_STATUS: dict[type[ArchfarmError], int] = {
    InvalidInput: 422,
    Unauthenticated: 401,
    Forbidden: 403,
    QuotaSpent: 429,
    NotFound: 404,
    ConfigError: 503,
    TransientError: 503,
}


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

    app.state.metrics = CollectorRegistry()
    app.state.metrics.register(FarmCollector(lambda: app.state.farm))
    for routes in (probes.router, jobs.router, uploads.router, artifacts.router, dashboard.router):
        app.include_router(routes)
    app.mount("/static", dashboard.STATIC, name="static")
    return app


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
