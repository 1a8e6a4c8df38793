"""Images over HTTP, named by their artifact id alone and read from where the farm recorded them, so no caller
can name a storage key; and revisions of them."""

from __future__ import annotations

import mimetypes
import re

from fastapi import APIRouter, Request, Response
from PIL import Image

from producer import dashboard, schemas
from producer.api.deps import farm, owned, queueing_farm
from producer.client import Farm, Part
from producer.remote import check_remote
from producer.views import ArtifactView, JobView
from shared.errors import InvalidInput
from shared.spec import JobSpec
from shared.thumbnails import CONTENT_TYPE

router = APIRouter()


@router.get("/artifacts/{artifact_id}")
def artifact(request: Request, artifact_id: dashboard.ArtifactId) -> ArtifactView:
    return farm(request).artifact(artifact_id)


@router.get("/artifacts/{artifact_id}/image")
def image(request: Request, artifact_id: dashboard.ArtifactId, download: bool = False) -> Response:
    """The PNG; `download=true` asks the browser to save it under a name that says what it is."""
    view = farm(request).artifact(artifact_id)
    headers = {"Content-Disposition": f'attachment; filename="{download_name(view)}"'} if download else {}
    return _stored(request, view, "image", mimetypes.guess_type(view.url)[0] or "image/png", headers)


@router.get("/artifacts/{artifact_id}/thumbnail")
def thumbnail(request: Request, artifact_id: dashboard.ArtifactId) -> Response:
    return _stored(request, farm(request).artifact(artifact_id), "thumbnail", CONTENT_TYPE)


@router.get("/artifacts/{artifact_id}/sidecar")
def sidecar(request: Request, artifact_id: dashboard.ArtifactId) -> Response:
    return _stored(request, farm(request).artifact(artifact_id), "sidecar", "application/json")


@router.post("/artifacts/{artifact_id}/revise", status_code=201)
def revise(
    request: Request, response: Response, artifact_id: dashboard.ArtifactId, body: schemas.ReviseRequest
) -> JobView:
    """A revision of an image as a child job: only the mask's region (an s3:// mask, or a rectangle) is rendered
    again, with the image's plan, profile, style and seed; every pixel beyond the feathered band is kept."""
    client = queueing_farm(request)
    if (body.mask is None) == (body.rect is None):
        raise InvalidInput("name the region to re-render: `mask` (an s3:// URL) or `rect` (left, top, right, bottom)")
    view = client.artifact(artifact_id)
    owned(request, view.job_id)
    mask: str | Image.Image
    if body.rect is not None:
        left, top, right, bottom = body.rect
        if not (left < right <= view.width and top < bottom <= view.height):
            raise InvalidInput(f"rect: {body.rect} is no rectangle inside the {view.width}×{view.height} image")
        mask = Image.new("L", (view.width, view.height), 0)
        mask.paste(255, (left, top, right, bottom))
    else:
        mask = str(body.mask)
    spec = client.revision(artifact_id, mask, prompt=body.prompt, seeds=body.seeds, feather=body.feather)
    return _child(request, response, client, spec)


@router.post("/artifacts/{artifact_id}/upscale", status_code=201)
def upscale(
    request: Request, response: Response, artifact_id: dashboard.ArtifactId, body: schemas.UpscaleRequest
) -> JobView:
    """An image enlarged to delivery size as a child job, tile by tile on every worker of the pool, with its
    plan, profile, style and seed; one task then blends the tiles into the image."""
    client = queueing_farm(request)
    owned(request, client.artifact(artifact_id).job_id)
    return _child(request, response, client, client.upscaling(artifact_id, **body.model_dump()))


def _child(request: Request, response: Response, client: Farm, spec: JobSpec) -> JobView:
    """Submit a job made from an image, as the caller's, and say where it is."""
    check_remote(spec, client.settings)
    owner = None if request.state.caller is None else request.state.caller.name
    job_id = client.submit(spec, owner=owner, remote=True)
    response.headers["Location"] = f"/jobs/{job_id}"
    return client.status(job_id)


def _stored(
    request: Request, view: ArtifactView, part: Part, media_type: str, headers: dict[str, str] | None = None
) -> Response:
    # An artifact's objects are rewritten only with the same inputs: a browser may keep them a while.
    headers = {"Cache-Control": "private, max-age=3600", **(headers or {})}
    return Response(farm(request).read(view, part), media_type=media_type, headers=headers)


def download_name(view: ArtifactView) -> str:
    """`floorplan_modern_seed-3_ab12cd34ef56.png`: plan, style and the image's own file name."""
    name = f"{view.plan}_{view.style}_{view.url.rsplit('/', 1)[-1]}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)
