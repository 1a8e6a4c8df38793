"""Jobs over HTTP: submit (any kind), list, watch, change (cancel, retry, pause, resume, priority, pick), and read
what a job made: its results with download links, its contact sheet, its plans."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi import Path as PathParam

from producer import dashboard, schemas
from producer.api.deps import farm, link_next, owned, queueing_farm
from producer.client import Farm
from producer.remote import check_remote
from producer.views import JobView
from shared.errors import InvalidInput, PlanError
from shared.kinds import parse_spec
from shared.spec import MAX_ECHO
from shared.thumbnails import CONTENT_TYPE

router = APIRouter()
Digest = Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$", description="a plan's SHA-256, as its tasks carry it")]


@router.post("/jobs", status_code=201)
def submit(request: Request, response: Response, job: dict[str, Any] = Body(...)) -> JobView:  # noqa: B008
    """A spec of any kind (its `kind`; render when it names none): checked, stored and queued. The body is read
    as a document rather than parsed by FastAPI, for archfarm's one-line errors and size checks."""
    client = queueing_farm(request)
    spec = parse_spec(job, packs=client.pack)
    check_remote(spec, client.settings)
    owner = None if request.state.caller is None else request.state.caller.name
    try:
        job_id = client.submit(spec, owner=owner, remote=True)
    except PlanError as error:  # one answer for missing, forbidden, too large and not-an-image alike
        limit = f"{client.settings.max_plan_bytes / 2**20:g} MiB"
        raise InvalidInput(f"{error.url[:MAX_ECHO]!r}: not a readable image of at most {limit}") from None
    response.headers["Location"] = f"/jobs/{job_id}"
    return client.status(job_id)


@router.get("/jobs")
def jobs(
    request: Request,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    status: str | None = None,
    cursor: Annotated[str | None, Query(max_length=36)] = None,
) -> list[JobView]:
    """Recent jobs, newest first; `status` keeps the jobs in that status. A full page links the next one
    (`Link: <...>; rel="next"`), whose `cursor` is the last job of this one: pages stay steady while jobs
    are added. Each job is listed without its failures and consistency: `GET /jobs/{id}` has them."""
    views = farm(request).jobs(limit=limit, status=dashboard.job_status(status), after=cursor)
    if len(views) == limit:
        link_next(request, response, views[-1].id)
    return views


@router.get("/jobs/{job_id}")
def status(request: Request, job_id: str) -> JobView:
    return farm(request).status(job_id)


def _change(request: Request, job_id: str, act: Callable[[Farm], object]) -> dict[str, Any]:
    """A change to a job by its owner (or an admin): the job as it is now, with what the change returned
    as `sent` (kept by the routes whose answer says how many tasks were sent)."""
    client = farm(request)
    owned(request, job_id)
    result = act(client)
    return {**client.status(job_id).model_dump(), "sent": result}


@router.post("/jobs/{job_id}/cancel", response_model=JobView)
def cancel(request: Request, job_id: str) -> dict[str, Any]:
    return _change(request, job_id, lambda client: client.cancel(job_id))


@router.post("/jobs/{job_id}/retry", response_model=schemas.JobAction)
def retry(request: Request, job_id: str) -> dict[str, Any]:
    return _change(request, job_id, lambda client: client.retry(job_id))


@router.post("/jobs/{job_id}/pause", response_model=JobView)
def pause(request: Request, job_id: str) -> dict[str, Any]:
    return _change(request, job_id, lambda client: client.pause(job_id))


@router.post("/jobs/{job_id}/resume", response_model=schemas.JobAction)
def resume(request: Request, job_id: str) -> dict[str, Any]:
    return _change(request, job_id, lambda client: client.resume(job_id))


@router.post("/jobs/{job_id}/priority", response_model=schemas.JobAction)
def priority(request: Request, job_id: str, body: schemas.Priority) -> dict[str, Any]:
    return _change(request, job_id, lambda client: client.set_priority(job_id, body.priority))


@router.post("/jobs/{job_id}/pick", response_model=schemas.PickAction)
def pick(request: Request, job_id: str, body: schemas.PickRequest) -> dict[str, Any]:
    """Pick drafts of a staged job waiting for picks (each is rendered again at full quality), and/or close
    its picks. Any number of times while it waits."""
    if not body.artifacts and not body.done:
        raise InvalidInput("name drafts to pick (`artifacts`), or set `done`")
    client = queueing_farm(request)
    owned(request, job_id)
    finals = client.pick(job_id, body.artifacts, done=body.done)
    return {**client.status(job_id).model_dump(), "finals": finals}


@router.get("/jobs/{job_id}/results", response_model=schemas.Results)
def results(
    request: Request,
    job_id: str,
    response: Response,
    limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
    cursor: Annotated[int | None, Query(ge=1, le=dashboard.MAX_ROW_ID)] = None,
    tiles: bool = False,
) -> dict[str, Any]:
    """Artifacts (all, or a page of `limit`, linking the next as `Link: <...>; rel="next"` whose `cursor` is
    this page's last image; an upscale's tiles with `tiles=true`) with pre-signed download links where the
    output's storage can sign them."""
    client = farm(request)
    view = client.status(job_id)
    # Links are signed for ARCHFARM_S3_PUBLIC_ENDPOINT_URL: the caller may reach S3 at another address.
    storage = client.storages.open(view.output_url)
    prefix = view.output_url.rstrip("/") + "/"
    artifacts = []
    page = client.results(job_id, limit=limit, after=cursor, tiles=tiles)
    if limit is not None and len(page) == limit:
        link_next(request, response, str(page[-1].id))
    for artifact in page:
        if storage.presigns:
            link = storage.presigned_url(artifact.url.removeprefix(prefix))
            artifact = artifact.model_copy(update={"download_url": link})
        artifacts.append(artifact)
    return {"job": job_id, "status": view.status.value, "artifacts": artifacts}


@router.get("/jobs/{job_id}/sheet")
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


@router.get("/jobs/{job_id}/plans/{digest}", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
def plan(request: Request, job_id: str, digest: Digest) -> Response:
    """A preview (JPEG) of one of the job's plans, by its content hash: read from where the job's tasks
    read it, never from a location the caller names."""
    headers = {"Cache-Control": "private, max-age=86400, immutable"}  # named by content: never another image
    return Response(farm(request).plan(job_id, digest), media_type=CONTENT_TYPE, headers=headers)
