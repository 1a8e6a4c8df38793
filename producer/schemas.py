"""The REST API's documents as pydantic models: `/openapi.json` describes every request and answer, so a
client can be generated from it, and FastAPI checks each answer against its model before sending it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from producer.client import ArtifactView
from shared.db.status import JobStatus


class Problem(BaseModel):
    """RFC 9457 problem details: the one shape of every error answer."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class Failure(BaseModel):
    task: str
    plan: str
    style: str
    seeds: str
    error: str


class TrainingProgress(BaseModel):
    """A training job's progress as its worker last wrote it: the step figures appear once the run has begun."""

    model_url: str = Field(description="where the trained ControlNet is published: what a profile's `model:` names")
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    skipped_rows: int | None = Field(None, description="dataset rows skipped so far as unreadable or mismatched")


class Job(BaseModel):
    id: str
    name: str
    priority: int = Field(ge=0, le=100)
    status: JobStatus
    counts: dict[str, int] = Field(description="tasks per state: queued, running, succeeded, failed, cancelled")
    total: int
    output_url: str
    created_at: datetime
    eta_s: float | None
    failures: list[Failure] = Field(description="the first 100 failed tasks, with their reasons")
    workers: int | None = Field(description="live workers that can take its tasks; null without a broker")
    paused: bool
    owner: str | None = Field(description="the token's name that submitted it; null from the CLI or Python")
    pool: str | None
    images_total: int
    images_done: int
    training: TrainingProgress | None = Field(None, description="training jobs only")


class JobAction(Job):
    sent: int = Field(description="task messages sent by this action")


class Results(BaseModel):
    job: str
    status: JobStatus
    artifacts: list[ArtifactView]


class Upload(BaseModel):
    url: str = Field(description="the s3:// URL to name in a job once the file is PUT")
    upload_url: str = Field(description="a presigned URL to PUT the file to, without credentials")
    method: Literal["PUT"]
    expires_in: int


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": why}
    for status, why in (
        (401, "no valid token where one is required"),
        (403, "another owner's job"),
        (404, "no such job or image"),
        (422, "invalid input: the detail names the field and the value"),
        (503, "the broker or the database is away, or the farm is not set up for this"),
    )
}
"""The error answers every route may give, for the schema."""
