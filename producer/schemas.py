"""The REST API's documents as pydantic models: `/openapi.json` describes every request and answer, so a
client can be generated from it, and FastAPI checks each answer against its model before sending it."""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from producer.dashboard import MAX_ROW_ID
from producer.views import ArtifactView, JobView
from shared.db.status import JobStatus


class _Request(BaseModel):
    """A request body as job specs are read: unknown fields refused, no coercion (`true` is not 1, `"90"` not
    90)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Problem(BaseModel):
    """RFC 9457 problem details: the one shape of every error answer."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class JobAction(JobView):
    sent: int = Field(description="task messages sent by this action")


class Results(BaseModel):
    job: str
    status: JobStatus
    artifacts: list[ArtifactView]


class Priority(_Request):
    priority: int = Field(ge=0, le=100, description="higher runs first")


class PickRequest(_Request):
    artifacts: list[Annotated[int, Field(ge=1, le=MAX_ROW_ID)]] = Field(
        default_factory=list, max_length=1000, description="ids of finished drafts to render as finals"
    )
    done: bool = Field(False, description="close the picks: the job ends with its finals")


class PickAction(JobView):
    finals: list[str] = Field(description="the final tasks this pick added (a draft picked before adds none)")


class ReviseRequest(_Request):
    mask: str | None = Field(None, max_length=2048, description="s3:// URL of a mask, white where to re-render")
    rect: list[Annotated[int, Field(ge=0, le=8192)]] | None = Field(
        None, min_length=4, max_length=4, description="or a rectangle to re-render: left, top, right, bottom (pixels)"
    )
    prompt: str | None = Field(None, min_length=1, max_length=2000, description="a new prompt (default: the image's)")
    seeds: int = Field(1, ge=1, le=64, description="variants, from the image's seed on")
    feather: int = Field(8, ge=0, le=256, description="pixels over which the change blends in")


class UpscaleRequest(_Request):
    long_side: int | None = Field(None, description="the result's longer side in pixels (or `scale`)")
    scale: float | None = Field(None, description="the result's size over the image's (or `long_side`)")
    tile: int | None = Field(None, description="tile side in pixels (default for the model family)")
    overlap: int | None = Field(None, description="least overlap of neighbouring tiles (default tile/8)")
    strength: float = Field(0.35, description="how much of each enlarged tile is rendered again")
    format: Literal["png", "tiff16", "jpeg"] = "png"
    plan_units: bool = Field(True, description="steer each tile with the profile's plan maps too")


class UploadRequest(_Request):
    name: str = Field(
        min_length=1, max_length=200, description="the file's name: its stem names the plan in keys and sheets"
    )
    size: int = Field(ge=1, description="the file's size in bytes, at most the farm's ARCHFARM_MAX_PLAN_BYTES")


class Upload(BaseModel):
    url: str = Field(description="the s3:// URL to name in a job once the file is PUT")
    upload_url: str = Field(description="a presigned URL to PUT the file to, without credentials")
    method: Literal["PUT"]
    size: int = Field(description="the PUT must carry exactly this many bytes: its Content-Length is signed")
    expires_in: int


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": why}
    for status, why in (
        (401, "no valid token where one is required"),
        (403, "another owner's job, or a browser's request from another site or port"),
        (404, "no such job or image"),
        (422, "invalid input: the detail names the field and the value"),
        (503, "the broker, the database or the storage is away, or the farm is not set up for this"),
    )
}
"""The error answers every route may give, for the schema."""


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem document: the one shape of every error answer."""
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail).model_dump()
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")
