"""The dashboard served by `archfarm api`: server-rendered pages over the same `Farm` as the REST API.

Each page is a template; its live parts are fragments of the same templates, which `static/dashboard.js`
fetches again every few seconds (`?fragment=NAME`), and its buttons call the REST API. No build step, no
client-side state: a page reloaded shows what the database says.

Signing in trades a token for a session (`shared.db.tokens`): the cookie holds the session's own secret,
never the token, lasts `SESSION_SECONDS`, is `Secure` when the page came over HTTPS, and sign-out ends it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from producer.client import Farm
from producer.templating import ENV
from producer.views import ArtifactView
from shared.db.status import JobStatus
from shared.db.tokens import SESSION_SECONDS, end_session, start_session
from shared.errors import InvalidInput
from shared.sidecar import Sidecar
from shared.spec import MAX_ECHO

STATIC = StaticFiles(directory=Path(__file__).parent / "static")

JOBS_PER_PAGE = 25
SHEET_ROWS = 20
SHEET_SEEDS = 10
"""A sheet page: 200 thumbnails of a few kilobytes each at most by default, whatever the job's size."""
SheetRows = Annotated[int, Query(ge=1, le=100)]
SheetSeeds = Annotated[int, Query(ge=1, le=50)]
MAX_OFFSET = 2**31 - 1
"""Far past any job's rows or seeds, and with a page added still inside a bigint and `islice`'s range."""
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
MAX_ROW_ID = 2**63 - 1
"""The largest bigint: an id past it is refused before it reaches the database."""

router = APIRouter(include_in_schema=False)

ArtifactId = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID)]
"""An artifact's row id: the only way an image is named over HTTP, never by a storage key."""
SESSION_COOKIE = "archfarm_session"


def _farm(request: Request) -> Farm:
    farm: Farm = request.app.state.farm
    return farm


def page(template: str, fragment: str | None = None, status_code: int = 200, **context: Any) -> HTMLResponse:
    """`template`, or only its part `_FRAGMENT.html` when the page's script asks for a live part again."""
    name = template if fragment is None else f"_{fragment}.html"
    return HTMLResponse(ENV.get_template(name).render(status_code=status_code, **context), status_code=status_code)


def job_status(value: str | None) -> JobStatus | None:
    """A status filter from a query string; InvalidInput names the valid ones."""
    if not value:
        return None
    try:
        return JobStatus(value)
    except ValueError:
        raise InvalidInput(f"status: {value[:MAX_ECHO]!r} is none of {', '.join(s.value for s in JobStatus)}") from None


def is_page(request: Request) -> bool:
    """Whether a request is the dashboard's, so an error is answered with a page rather than JSON."""
    return request.url.path == "/" or request.url.path.startswith("/ui/")


LOGIN = "/ui/login"


def sign_in_redirect(request: Request) -> RedirectResponse:
    """To the sign-in page, coming back here afterwards."""
    return RedirectResponse(f"{LOGIN}?{urlencode({'next': request.url.path})}", status_code=303)


@router.get(LOGIN)
def login_form(next: str = "/", failed: bool = False) -> HTMLResponse:  # the query's name
    return page("login.html", title="sign in", next=_local(next), failed=failed)


@router.post(LOGIN)
def login(
    request: Request, token: Annotated[str, Form(max_length=200)], next: Annotated[str, Form()] = "/"
) -> Response:
    """A valid token starts a session, kept in an HttpOnly, SameSite=Strict cookie (`Secure` over HTTPS)."""
    with _farm(request).sessions.begin() as session:
        secret = start_session(session, token.strip())
    if secret is None:
        return RedirectResponse(f"{LOGIN}?{urlencode({'next': _local(next), 'failed': 'true'})}", status_code=303)
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, secret, max_age=SESSION_SECONDS, **_cookie(request))
    return response


@router.post("/ui/logout")
def logout(request: Request) -> Response:
    """Ends the session where it is kept, so a copy of the cookie is worth nothing afterwards."""
    secret = request.cookies.get(SESSION_COOKIE)
    if secret:
        with _farm(request).sessions.begin() as session:
            end_session(session, secret)
    response = RedirectResponse(LOGIN, status_code=303)
    response.delete_cookie(SESSION_COOKIE, **_cookie(request))
    return response


def _cookie(request: Request) -> dict[str, Any]:
    """The session cookie's attributes: out of scripts' reach, never sent from another site's pages, and over
    HTTPS only where the dashboard is served over HTTPS (behind a proxy, as its X-Forwarded-Proto says)."""
    return {"httponly": True, "samesite": "strict", "secure": request.url.scheme == "https", "path": "/"}


def _local(target: str) -> str:
    """Only a path of this site to go back to: never another host (`//evil`, `https://...`), nor a page's worth."""
    local = target.startswith("/") and not target.startswith(("//", "/\\")) and len(target) <= 1000
    return target if local else "/"


def error_page(message: str, status_code: int) -> HTMLResponse:
    return page("error.html", status_code=status_code, message=message, title="error")


@router.get("/")
def jobs(request: Request, status: str | None = None, offset: Offset = 0, fragment: str | None = None) -> HTMLResponse:
    wanted = job_status(status)
    views = _farm(request).jobs(limit=JOBS_PER_PAGE + 1, offset=offset, status=wanted)
    return page(
        "jobs.html",
        _only(fragment, "jobs"),
        title="Jobs",
        views=views[:JOBS_PER_PAGE],
        more=len(views) > JOBS_PER_PAGE,
        status=wanted,
        statuses=list(JobStatus),
        offset=offset,
        per_page=JOBS_PER_PAGE,
    )


@router.get("/ui/jobs/{job_id}")
def job(
    request: Request,
    job_id: str,
    row: Offset = 0,
    seed: Offset = 0,
    rows: SheetRows = SHEET_ROWS,
    seeds: SheetSeeds = SHEET_SEEDS,
    fragment: str | None = None,
) -> HTMLResponse:
    """The job's summary, controls, a page of its contact sheet (each row beside its plan) and its failures by
    plan and reason (a training job has no sheet: its summary shows steps, loss and where the model goes); a
    live part reads only what it shows."""
    farm = _farm(request)
    part = _only(fragment, "summary", "sheet", "failures")
    context: dict[str, Any] = {}
    training = False
    if part != "sheet":
        view = farm.status(job_id)
        context.update(title=view.name, view=view, active=not view.status.still)
        training = view.training is not None
    if part in (None, "sheet") and not training:
        context.update(
            sheet=farm.sheet(job_id, row_offset=row, rows=rows, seed_offset=seed, seeds=seeds),
            rows=rows,
            seeds=seeds,
            src=lambda artifact: f"/artifacts/{artifact.id}/thumbnail",
            href=lambda artifact: f"/ui/artifacts/{artifact.id}",
            plan_src=lambda row: f"/jobs/{job_id}/plans/{row.plan_digest}",
        )
    return page("job.html", part, **context)


@router.get("/ui/workers")
def workers(request: Request, fragment: str | None = None) -> HTMLResponse:
    return page("workers.html", _only(fragment, "workers"), title="Workers", views=_farm(request).workers())


@router.get("/ui/artifacts/{artifact_id}")
def artifact(request: Request, artifact_id: ArtifactId, fragment: str | None = None) -> HTMLResponse:
    farm = _farm(request)
    view = farm.artifact(artifact_id)
    meta = Sidecar.model_validate_json(farm.read(view, "sidecar"))
    ancestors, children = farm.lineage(artifact_id)
    return page(
        "artifact.html",
        _only(fragment, "artifact"),
        title=f"{view.plan} / {view.style} / seed {view.seed}",
        artifact=view,
        details=details(view, meta),
        ancestors=ancestors,
        children=children,
    )


def details(view: ArtifactView, meta: Sidecar) -> dict[str, Any]:
    """What a person checks about one image, out of its sidecar: prompt, models, control scales, seed, timings."""
    profile, models = meta.profile, meta.models
    return {
        "prompt": meta.style.get("prompt", ""),
        "negative_prompt": meta.style.get("negative_prompt", ""),
        "seed": meta.seed,
        "base": models.base.name,
        "vae": models.vae.name if models.vae else None,
        "controls": [
            {**unit, "model": model.name}
            for unit, model in zip(profile.get("controls", []), models.controlnets, strict=False)
        ],
        "render": {
            "size": f"{profile.get('width')}×{profile.get('height')}",
            "steps": profile.get("steps"),
            "guidance": profile.get("guidance_scale"),
            "scheduler": meta.scheduler.get("class", profile.get("scheduler")),
            "device": meta.device,
            "threads": meta.threads,
        },
        "timings": meta.timings,
        "key": meta.key,
    }


def _only(fragment: str | None, *names: str) -> str | None:
    if fragment is not None and fragment not in names:
        raise InvalidInput(f"fragment: {fragment[:MAX_ECHO]!r} is none of {', '.join(names)}")
    return fragment
