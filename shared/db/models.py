"""Tables `jobs`, `tasks`, `artifacts`, `workers`, `task_failures`, `api_tokens`, `api_sessions`, `notifications` as
typed models.

A job's status is not stored: it is derived from its task rows (`shared.db.status`), so duplicate deliveries
and concurrent workers cannot leave a counter out of step with reality.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class TaskStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class JobKind(str, enum.Enum):
    """What a job does; each kind has its own spec (`shared.kinds`), submission and worker handler."""

    RENDER = "render"
    """Plans × styles × seeds rendered through a ControlNet stack: a task per plan, style and seed chunk."""
    TRAIN = "train"
    """A ControlNet trained on a dataset: one task, resumed from its checkpoints wherever it is delivered."""


class PickGate(str, enum.Enum):
    """A staged job's gate between drafts and finals (`shared.db.stages`); unstaged jobs have none."""

    OPEN = "open"
    """Picks are taken (each renders its final at once); a job with nothing left to render waits for more."""
    RULE = "rule"
    """A rule picks (`pick: by: adherence`): once every draft has ended it picks and the gate closes."""
    CLOSED = "closed"
    """No more picks: the job ends when its finals do."""


class FailureKind(str, enum.Enum):
    """A failed attempt recorded in `task_failures`: what a task's history and a node's blocklist count."""

    TRANSIENT = "transient"
    """Storage, database or broker away: counted against the task's time budget, never against a node."""
    ERROR = "error"
    """An error the task raised: another node tries it; the only kind that may blocklist a node."""
    CRASH = "crash"
    """The process running it died: held against the task, never the node."""


class NotificationState(str, enum.Enum):
    """A notification row's life: armed at submit, then due (the event happened) or skipped (it did not), then
    delivered or abandoned (its attempts used up)."""

    ARMED = "armed"
    DUE = "due"
    DELIVERED = "delivered"
    SKIPPED = "skipped"
    ABANDONED = "abandoned"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[Any]: JSON}


def _stored(kind: type[enum.Enum], name: str, constraint: bool = True) -> Enum:
    """An enum stored by value ("queued") as a VARCHAR, with a CHECK where the table was made with one: adding
    a member is then a plain migration."""
    return Enum(
        kind,
        name=name,
        native_enum=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
        create_constraint=constraint,
    )


_status = _stored(TaskStatus, "task_status")
HELD = text("status = 'queued' AND dispatched_at IS NULL")
"""Queued tasks without a message: they wait in the database for their turn (`shared.dispatch`)."""
SENT = text("status = 'queued' AND dispatched_at IS NOT NULL")
"""Queued tasks with a message in the broker (or lost with it: the sweeper's)."""


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[JobKind] = mapped_column(
        _stored(JobKind, "job_kind"), server_default=JobKind.RENDER.value, comment="what the job does"
    )
    name: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=50)
    spec: Mapped[dict[str, Any]] = mapped_column(comment="the validated job spec, styles resolved")
    digest: Mapped[str] = mapped_column(
        String(64),
        comment="content hash of what decides the job's outputs: a render's profile, a training run's data, model "
        "and optimiser settings",
    )
    output_url: Mapped[str] = mapped_column(String(2048))
    queue: Mapped[str] = mapped_column(
        String(255), server_default="archfarm", comment="the broker queue every message of this job goes to"
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(default=None)
    paused_at: Mapped[datetime | None] = mapped_column(
        default=None, comment="set while the job is paused: its queued tasks wait, running ones finish"
    )
    owner: Mapped[str | None] = mapped_column(
        String(64), default=None, comment="the API token's name that submitted it; None: this machine's CLI or Python"
    )
    gate: Mapped[PickGate | None] = mapped_column(
        _stored(PickGate, "pick_gate", False), default=None, comment="a staged job's pick gate: open, rule, closed"
    )
    picks_close_at: Mapped[datetime | None] = mapped_column(
        default=None, comment="when an open pick gate closes by itself (`pick.timeout`; database clock)"
    )
    deadline_at: Mapped[datetime | None] = mapped_column(
        default=None, comment="when the job should be done (`deadline:`): earliest first within a priority"
    )
    expected_at: Mapped[datetime | None] = mapped_column(
        default=None,
        comment="the finish the farm forecast when it first expected the job to miss its deadline (notified)",
    )

    __table_args__ = (Index("ix_jobs_created_at", "created_at"),)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer, comment="position in the job's expansion order")
    # What a render task renders. Null for a task of another kind (its job's spec says what it does), which
    # only render code reads: typed as render code sees them.
    plan_url: Mapped[str] = mapped_column(String(2048), nullable=True)
    plan_name: Mapped[str] = mapped_column(String(64), nullable=True)
    plan_digest: Mapped[str] = mapped_column(String(64), nullable=True)
    style: Mapped[str] = mapped_column(String(64), nullable=True)
    seeds: Mapped[list[Any]] = mapped_column(nullable=True)
    outputs: Mapped[list[Any]] = mapped_column(nullable=True)
    stage: Mapped[str | None] = mapped_column(String(16), default=None, comment="a staged job's pass: draft, final")
    source_id: Mapped[int | None] = mapped_column(
        BigInteger, default=None, comment="the artifact a final starts from (its picked draft, of the same job)"
    )
    reroll_of: Mapped[int | None] = mapped_column(
        BigInteger, default=None, comment="a re-roll's first image: the one rendered with the job's own seed"
    )
    status: Mapped[TaskStatus] = mapped_column(_status, default=TaskStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    due_at: Mapped[datetime] = mapped_column(
        server_default=text("CURRENT_TIMESTAMP"),
        comment="when a queued task's latest message becomes deliverable (database clock); the sweeper re-sends "
        "tasks long past it",
    )
    progress: Mapped[dict[str, Any] | None] = mapped_column(
        default=None, comment="a training task's latest step, loss and rate, written by the worker that runs it"
    )
    dispatched_at: Mapped[datetime | None] = mapped_column(
        default=None,
        comment="when its message was sent (database clock); null while a queued task waits in the database for "
        "its turn (shared.dispatch)",
    )

    __table_args__ = (
        Index("ix_tasks_job_status", "job_id", "status", "ordinal"),
        Index("ix_tasks_job_ordinal", "job_id", "ordinal"),
        Index("ix_tasks_status_due", "status", "due_at"),
        Index("ix_tasks_finished_at", "finished_at"),
        Index("ix_tasks_held", "job_id", "ordinal", postgresql_where=HELD, sqlite_where=HELD),
        Index("ix_tasks_sent", "due_at", postgresql_where=SENT, sqlite_where=SENT),
    )


class JobCounts(Base):
    """A job's tasks by status, its finals and images, and its first start, kept by the database itself.

    Triggers on `tasks` and `artifacts` (migration 0016) change a job's row in the same statement as its
    tasks, so the counts can never be out of step with the rows, whoever changes them; every read of a job
    (status, the API, `/metrics`, the dashboard) costs one row, however many tasks the job has."""

    __tablename__ = "job_counts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    queued: Mapped[int] = mapped_column(Integer, server_default="0")
    running: Mapped[int] = mapped_column(Integer, server_default="0")
    succeeded: Mapped[int] = mapped_column(Integer, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, server_default="0")
    cancelled: Mapped[int] = mapped_column(Integer, server_default="0")
    finals: Mapped[int] = mapped_column(Integer, server_default="0", comment="final tasks a staged job's picks added")
    images: Mapped[int] = mapped_column(Integer, server_default="0", comment="artifacts stored")
    started_at: Mapped[datetime | None] = mapped_column(default=None, comment="when its first task started")

    def by_status(self) -> dict[TaskStatus, int]:
        """The statuses the job has tasks in, with how many."""
        return {status: count for status in TaskStatus if (count := getattr(self, status.value))}


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(
        String(16), server_default="render", comment="render (a single-pass job), draft or final"
    )
    plan_digest: Mapped[str] = mapped_column(String(64))
    style: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("artifacts.id", ondelete="SET NULL", name="fk_artifacts_parent"),
        default=None,
        comment="the image this one was made from",
    )
    adherence: Mapped[float | None] = mapped_column(
        Float, default=None, comment="how well the image's edges follow its plan's (F-score, 0-1)"
    )
    picked_at: Mapped[datetime | None] = mapped_column(default=None, comment="when a draft was picked for a final")
    seam: Mapped[float | None] = mapped_column(
        Float,
        default=None,
        comment="an upscale's mean gradient on tile edges over its mean gradient (1: no seam shows)",
    )
    look: Mapped[list[Any] | None] = mapped_column(
        default=None, comment="palette (CIELAB lightness and chroma) and texture histograms (workers.look)"
    )
    reroll_of: Mapped[int | None] = mapped_column(
        ForeignKey("artifacts.id", ondelete="CASCADE", name="fk_artifacts_reroll_of"),
        default=None,
        comment="a re-rolled image's first render (the job's own seed): the chain it belongs to",
    )
    superseded_by: Mapped[int | None] = mapped_column(
        ForeignKey("artifacts.id", ondelete="SET NULL", name="fk_artifacts_superseded_by"),
        default=None,
        comment="the kept image of its re-roll chain, on each of the others (kept, not delivered)",
    )
    url: Mapped[str] = mapped_column(String(2048))
    sidecar_url: Mapped[str] = mapped_column(String(2048))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("job_id", "stage", "plan_digest", "style", "seed", name="uq_artifacts_image"),
        Index("ix_artifacts_task_id", "task_id"),
        Index("ix_artifacts_reroll_of", "reroll_of"),
        Index("ix_artifacts_job_style_seed", "job_id", "style", "seed", "id"),
    )


class Cost(Base):
    """Measured GPU-seconds per image of a profile on a device model, a moving average (`shared.db.costs`)."""

    __tablename__ = "costs"

    profile_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    device: Mapped[str] = mapped_column(String(128), primary_key=True, comment="the device model: NVIDIA H100, cpu")
    seconds_per_image: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(server_default=text("CURRENT_TIMESTAMP"))


class Worker(Base):
    """One worker process incarnation (a restart is a new row), with its heartbeat.

    `id` is `NODE#INCARNATION`; `node` (`archfarm-cuda0@host`) is stable across restarts, so a blocklist
    on a node outlives a crash loop, while liveness is judged per incarnation.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    node: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(32))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)
    current_task: Mapped[str | None] = mapped_column(String(36), default=None)
    idle_since: Mapped[datetime | None] = mapped_column(
        default=None, comment="set while the worker holds no task (database clock): the sweeper's evidence"
    )
    queues: Mapped[list[Any]] = mapped_column(server_default="[]")
    models: Mapped[list[Any]] = mapped_column(default=list)
    images_done: Mapped[int] = mapped_column(Integer, default=0)
    model_loads: Mapped[int] = mapped_column(Integer, default=0)
    stack_swaps: Mapped[int] = mapped_column(Integer, default=0)
    ready_at: Mapped[datetime | None] = mapped_column(
        default=None, comment="when its pool process began taking tasks, its profiles warmed (database clock)"
    )
    memory_bytes: Mapped[int | None] = mapped_column(
        BigInteger, default=None, comment="what its device offers model stacks; set when its pool process is ready"
    )
    warmed: Mapped[list[Any]] = mapped_column(
        server_default="[]",
        comment="what its pool process compiled before taking tasks: per profile, buckets and seconds",
    )

    __table_args__ = (Index("ix_workers_heartbeat", "stopped_at", "heartbeat_at"),)


class TaskFailure(Base):
    """One failed attempt, by kind (`workers.policy.COUNTED`): a task's history, and for kind "error" the
    node's blocklist ("3 tasks of this job failed here")."""

    __tablename__ = "task_failures"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    node: Mapped[str] = mapped_column(String(255))
    kind: Mapped[FailureKind] = mapped_column(_stored(FailureKind, "failure_kind", False), server_default="error")
    error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_task_failures_task", "task_id"), Index("ix_task_failures_job_node", "job_id", "node"))


class ApiToken(Base):
    """A bearer token of the REST API, stored as its SHA-256: the token itself is shown once, at creation."""

    __tablename__ = "api_tokens"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiSession(Base):
    """A dashboard sign-in: the browser's cookie holds a random value of its own, never the token, stored here as
    its SHA-256. It lasts a few hours, ends with sign-out, and with its token's revocation."""

    __tablename__ = "api_sessions"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    token: Mapped[str] = mapped_column(ForeignKey("api_tokens.name", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()

    __table_args__ = (Index("ix_api_sessions_expires_at", "expires_at"),)


class Notification(Base):
    """One event of a job for one URL (`shared.notify`): armed at submit, fired by whoever sees the event
    first, each attempt claimed by one sender; every step is a conditional UPDATE, so several workers noticing
    the same end, or one dying on the way, cannot send an event twice or lose it."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(String(2048))
    run: Mapped[int] = mapped_column(
        Integer, default=0, comment="0 at submit, one more each time a retry arms the job's events again"
    )
    state: Mapped[NotificationState] = mapped_column(
        _stored(NotificationState, "notification_state", False),
        default=NotificationState.ARMED,
        comment="armed (waiting for the event), due, delivered; skipped (the event did not happen), abandoned "
        "(attempts used up)",
    )
    body: Mapped[str | None] = mapped_column(Text, default=None, comment="the JSON sent, fixed when the event fired")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(
        default=None, comment="when a due notification may be tried (database clock); a claim moves it past the try"
    )
    fired_at: Mapped[datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)

    __table_args__ = (
        UniqueConstraint("job_id", "event", "url", name="uq_notifications_event"),
        Index("ix_notifications_state_due", "state", "next_attempt_at"),
    )
