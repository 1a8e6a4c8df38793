"""What operators and orchestrators ask: is the process up, can it serve (database, broker, storage), the
farm's metrics, and its workers."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producer.api.deps import farm
from producer.schemas import problem
from producer.views import WorkerView

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus' text format, answered at /metrics itself (a mounted app redirects to /metrics/)."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (a liveness probe)."""
    return {"status": "ok"}


@router.get("/readyz")
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


@router.get("/workers")
def workers(request: Request) -> list[WorkerView]:
    return farm(request).workers()
