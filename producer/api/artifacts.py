"""Images over HTTP, named by their artifact id alone and read from where the farm recorded them, so no caller
can name a storage key."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response

from producer import dashboard
from producer.api.deps import farm
from producer.client import Part
from producer.views import ArtifactView
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
    return _stored(request, view, "image", "image/png", headers)


@router.get("/artifacts/{artifact_id}/thumbnail")
def thumbnail(request: Request, artifact_id: dashboard.ArtifactId) -> Response:
    return _stored(request, farm(request).artifact(artifact_id), "thumbnail", CONTENT_TYPE)


@router.get("/artifacts/{artifact_id}/sidecar")
def sidecar(request: Request, artifact_id: dashboard.ArtifactId) -> Response:
    return _stored(request, farm(request).artifact(artifact_id), "sidecar", "application/json")


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
