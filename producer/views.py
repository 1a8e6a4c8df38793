"""What the farm shows of its jobs, workers and images: one typed view of each, read by the CLI (`--json`),
the Python client, the dashboard's templates and the REST API (its response models, so `/openapi.json`
describes exactly what every reader gets)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.db.clock import aware
from shared.db.models import Artifact, PickGate, TaskStatus, Worker
from shared.db.status import JobStatus

WorkerState = Literal["live", "stale", "dead", "stopped"]


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class Failure(View):
    task: str
    plan: str
    style: str
    seeds: str
    error: str


class FailureGroup(View):
    plan: str
    error: str
    count: int = Field(description="failed tasks of this plan with this reason")


class StyleConsistency(View):
    """How alike one style's images of one pass look (`shared.consistency`)."""

    stage: str = Field(description="render (a single-pass job), draft or final")
    style: str
    score: float = Field(description="1 minus the images' mean palette-and-texture distance to the set (0-1)")
    images: int = Field(description="images measured")
    outliers: list[int] = Field(description="ids of the images that stray from the others")
    palette: float | None = Field(
        None, description="with a style pack's palette: the images' mean share of colour on it (0-1)"
    )


class TrainingProgress(View):
    """A training job's progress as its worker last wrote it: the step figures appear once the run has begun."""

    model_url: str = Field(description="where the trained ControlNet is published: what a profile's `model:` names")
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    skipped_rows: int | None = Field(None, description="dataset rows skipped so far as unreadable or mismatched")


class JobView(View):
    id: str
    name: str
    priority: int = Field(ge=0, le=100)
    status: JobStatus
    counts: dict[str, int] = Field(description="tasks per state: queued, running, succeeded, failed, cancelled")
    total: int
    output_url: str
    created_at: datetime
    eta_s: float | None = None
    work_left_s: float | None = Field(
        None,
        description="GPU-seconds of its queued and running images: their profile's measured cost per image "
        "(shared.db.costs), else a prior from its family, size, steps and units",
    )
    deadline_at: datetime | None = Field(None, description="when it should be done (`deadline:`)")
    expected_at: datetime | None = Field(
        None,
        description="when the farm expects it done: its work left and that of the jobs ahead of it in its pool, "
        "over the pool's live workers (shared.deadlines); null while paused, without a live worker, and in "
        "lists of jobs",
    )
    at_risk: bool = Field(False, description="whether the farm expects it to finish after its deadline")
    failures: list[Failure] = Field(
        default_factory=list, description="the first failed tasks (100 at most), one by one, with their reasons"
    )
    failure_groups: list[FailureGroup] = Field(
        default_factory=list,
        description="every failed task counted by plan and reason, most frequent first (50 groups at most): 71 "
        "tasks failing for one reason read as one line",
    )
    workers: int | None = Field(
        None, description="live workers that can take its tasks; null without a broker (this process renders it)"
    )
    workers_live: int | None = Field(
        None,
        description="live workers of its pool, blocklisted for it or not (those beyond `workers` are); null "
        "without a broker",
    )
    paused: bool = False
    owner: str | None = Field(None, description="the token's name that submitted it; null from the CLI or Python")
    pool: str | None = Field(None, description="the workers it renders on (`archfarm worker --pool NAME`)")
    images_total: int = 0
    images_done: int = Field(0, description="images stored so far (a task's images count as they are recorded)")
    training: TrainingProgress | None = Field(None, description="training jobs only")
    pick_gate: PickGate | None = Field(
        None,
        description="a staged job's pick gate: open (picks are taken), rule (a rule picks once its drafts end) or "
        "closed; null for a single-pass job",
    )
    picks_close_at: datetime | None = Field(None, description="when open picks close by themselves (`pick.timeout`)")
    consistency: list[StyleConsistency] = Field(
        default_factory=list,
        description="per pass and style with 3 images or more: how alike its views look, and its outliers",
    )

    @property
    def done(self) -> int:
        """Tasks that have ended, however they ended (the progress through the job)."""
        return sum(self.counts.get(s.value, 0) for s in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED))

    @property
    def rendered(self) -> int:
        """Tasks whose images were all written."""
        return self.counts.get(TaskStatus.SUCCEEDED.value, 0)


class WorkerView(View):
    id: str
    node: str
    device: str
    pools: list[str]
    models: list[str]
    current_task: str | None
    images_done: int
    model_loads: int
    stack_swaps: int
    heartbeat_age_s: float
    state: WorkerState = Field(
        description="live; stale (its heartbeat is late, not yet declared dead); dead (reaped); stopped (shut down)"
    )
    ready_s: float | None = Field(
        None, description="seconds from its start until its pool process took tasks (warmed); null while warming"
    )
    warmed: list[dict[str, Any]] = Field(
        default_factory=list, description="what it compiled before taking tasks: per profile, buckets and seconds"
    )
    memory_gib: float | None = Field(None, description="what its device offers model stacks; null while warming")

    @classmethod
    def of(cls, row: Worker, now: datetime, timeout_s: float) -> WorkerView:
        age = (now - aware(row.heartbeat_at)).total_seconds()
        state: WorkerState
        if row.stopped_at is not None:  # a reaper stops a worker a timeout after its last heartbeat; a shutdown at once
            silent = (aware(row.stopped_at) - aware(row.heartbeat_at)).total_seconds()
            state = "dead" if silent >= timeout_s else "stopped"
        else:
            state = "live" if age < timeout_s / 2 else "stale"
        return cls(
            id=row.id,
            node=row.node,
            device=row.device,
            pools=list(row.queues),
            models=list(row.models),
            current_task=row.current_task,
            images_done=row.images_done,
            model_loads=row.model_loads,
            stack_swaps=row.stack_swaps,
            heartbeat_age_s=age,
            state=state,
            ready_s=None if row.ready_at is None else (aware(row.ready_at) - aware(row.started_at)).total_seconds(),
            warmed=list(row.warmed),
            memory_gib=None if row.memory_bytes is None else row.memory_bytes / 2**30,
        )


class ArtifactView(View):
    id: int
    job_id: str
    plan: str = Field(description="the plan's name, as in the image's key")
    plan_digest: str
    style: str
    seed: int
    url: str
    sidecar_url: str
    width: int
    height: int
    size_bytes: int
    stage: str = Field("render", description="render (a single-pass job), draft, final, tile or upscale")
    parent_id: int | None = Field(None, description="the image this one was made from (a final's draft)")
    adherence: float | None = Field(None, description="how well its edges follow its plan's control map (0-1)")
    seam: float | None = Field(None, description="an upscale's seam score: 1 where no tile edge shows")
    picked: bool = Field(False, description="a draft picked for a final")
    reroll_of: int | None = Field(None, description="a re-roll's first image (rendered with the job's own seed)")
    superseded_by: int | None = Field(
        None, description="the image kept instead of this one: its re-roll chain's best (this one is not delivered)"
    )
    download_url: str | None = Field(None, description="a presigned GET link, where the output is on S3")

    @classmethod
    def of(cls, row: Artifact, plan: str) -> ArtifactView:
        return cls(
            id=row.id,
            job_id=row.job_id,
            plan=plan,
            plan_digest=row.plan_digest,
            style=row.style,
            seed=row.seed,
            url=row.url,
            sidecar_url=row.sidecar_url,
            width=row.width,
            height=row.height,
            size_bytes=row.size_bytes,
            stage=row.stage,
            parent_id=row.parent_id,
            adherence=row.adherence,
            seam=row.seam,
            picked=row.picked_at is not None,
            reroll_of=row.reroll_of,
            superseded_by=row.superseded_by,
        )
