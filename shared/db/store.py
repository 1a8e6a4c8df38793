"""State changes on tasks and jobs.

Every transition is a conditional UPDATE (`WHERE status IN (...)`) whose row count says whether this caller
won: a duplicate delivery, a late worker or a concurrent cancel can never move a task backwards or count an
image twice. SQLite ignores `FOR UPDATE SKIP LOCKED`, so nothing here relies on row locks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from types import EllipsisType
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from shared.db.models import Artifact, Job, Task, TaskFailure, TaskStatus, Worker, utcnow
from shared.db.status import JobStatus, job_status

MAX_ERROR_CHARS = 4000


def _transition(
    session: Session,
    task_id: str,
    frm: Iterable[TaskStatus],
    to: TaskStatus,
    *,
    held_by: str | None = None,
    **values: Any,
) -> bool:
    stmt = update(Task).where(Task.id == task_id, Task.status.in_(list(frm)))
    if held_by is not None:
        stmt = stmt.where(Task.worker == held_by)
    result = session.execute(stmt.values(status=to, **values).execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined]


def claim_task(session: Session, task_id: str, worker: str) -> bool:
    """queued → running for `worker`; False when another worker, a cancel or a finish got there first.

    A task already running *for this worker* is claimed again: a worker runs one task at a time, so being
    handed a task it holds means its previous attempt died with its pool process.
    """
    stmt = (
        update(Task)
        .where(
            Task.id == task_id,
            or_(Task.status == TaskStatus.QUEUED, and_(Task.status == TaskStatus.RUNNING, Task.worker == worker)),
        )
        .values(status=TaskStatus.RUNNING, worker=worker, attempts=Task.attempts + 1, started_at=utcnow(), error=None)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]


def finish_task(session: Session, task_id: str, worker: str) -> bool:
    """running → succeeded, only for the worker that holds the task."""
    return _transition(
        session, task_id, [TaskStatus.RUNNING], TaskStatus.SUCCEEDED, held_by=worker, finished_at=utcnow()
    )


def fail_task(session: Session, task_id: str, worker: str, error: str) -> bool:
    """running → failed with the reason stored on the row."""
    return _transition(
        session,
        task_id,
        [TaskStatus.RUNNING],
        TaskStatus.FAILED,
        held_by=worker,
        finished_at=utcnow(),
        error=error[:MAX_ERROR_CHARS],
    )


def release_task(session: Session, task_id: str, worker: str, status: TaskStatus = TaskStatus.QUEUED) -> bool:
    """running → queued (handed back) or cancelled (stopped by a cancel), for the holding worker."""
    values: dict[str, Any] = {"finished_at": utcnow() if status is TaskStatus.CANCELLED else None}
    if status is TaskStatus.QUEUED:
        values["worker"] = None
    return _transition(session, task_id, [TaskStatus.RUNNING], status, held_by=worker, **values)


def requeue_held(session: Session, worker: str) -> list[str]:
    """Every task running for `worker` back to queued (it died or is stopping); ids to send again."""
    return list(
        session.scalars(
            update(Task)
            .where(Task.worker == worker, Task.status == TaskStatus.RUNNING)
            .values(status=TaskStatus.QUEUED, worker=None, started_at=None)
            .returning(Task.id)
            .execution_options(synchronize_session=False)
        )
    )


def record_failure(session: Session, task_id: str, job_id: str, node: str, error: str) -> tuple[int, int]:
    """Store one failed attempt; returns (distinct nodes, attempts) that have now failed this task."""
    session.add(TaskFailure(task_id=task_id, job_id=job_id, node=node, error=error[:MAX_ERROR_CHARS]))
    session.flush()
    nodes, attempts = session.execute(
        select(func.count(func.distinct(TaskFailure.node)), func.count()).where(TaskFailure.task_id == task_id)
    ).one()
    return int(nodes), int(attempts)


def blocklisted_nodes(session: Session, job_id: str, limit: int) -> set[str]:
    """Nodes that failed `limit` distinct tasks of a job: they stop taking that job's tasks."""
    rows = session.execute(
        select(TaskFailure.node)
        .where(TaskFailure.job_id == job_id)
        .group_by(TaskFailure.node)
        .having(func.count(func.distinct(TaskFailure.task_id)) >= limit)
    )
    return set(rows.scalars())


def live_nodes(session: Session) -> set[str]:
    return set(session.scalars(select(Worker.node).where(Worker.stopped_at.is_(None))))


def cancel_job(session: Session, job_id: str) -> int:
    """Mark the job cancelled and cancel its queued tasks; running ones stop at their next step."""
    session.execute(update(Job).where(Job.id == job_id, Job.cancelled_at.is_(None)).values(cancelled_at=utcnow()))
    result = session.execute(
        update(Task)
        .where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED)
        .values(status=TaskStatus.CANCELLED, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def retry_job(session: Session, job_id: str) -> list[str]:
    """Failed and cancelled tasks back to queued; returns their ids, for the caller to enqueue.

    The job's failure history goes too: a retry says the cause was fixed, so no worker stays blocklisted.
    """
    session.execute(update(Job).where(Job.id == job_id).values(cancelled_at=None))
    session.execute(delete(TaskFailure).where(TaskFailure.job_id == job_id))
    ids = list(
        session.scalars(
            update(Task)
            .where(Task.job_id == job_id, Task.status.in_([TaskStatus.FAILED, TaskStatus.CANCELLED]))
            .values(status=TaskStatus.QUEUED, error=None, worker=None, started_at=None, finished_at=None)
            .returning(Task.id)
            .execution_options(synchronize_session=False)
        )
    )
    return ids


def is_cancelled(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.cancelled_at).where(Job.id == job_id)) is not None


def task_counts(session: Session, job_id: str) -> dict[TaskStatus, int]:
    rows = session.execute(select(Task.status, func.count()).where(Task.job_id == job_id).group_by(Task.status)).all()
    return {status: count for status, count in rows}


def status_of(session: Session, job: Job) -> tuple[JobStatus, dict[TaskStatus, int]]:
    counts = task_counts(session, job.id)
    return job_status(counts, job.cancelled_at is not None), counts


def record_artifacts(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert artifact rows; a redelivered task rewrote the same objects, so a conflict updates in place."""
    if not rows:
        return
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[session.get_bind().dialect.name]
    stmt = insert(Artifact).values(list(rows))
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "plan_digest", "style", "seed"],
        set_={c: stmt.excluded[c] for c in ("task_id", "url", "sidecar_url", "width", "height", "size_bytes")},
    )
    session.execute(stmt)


def register_worker(session: Session, worker_id: str, node: str, device: str, pid: int) -> None:
    session.add(Worker(id=worker_id, node=node, device=device, pid=pid))


def heartbeat(session: Session, worker_id: str) -> bool:
    """Refresh a live worker's heartbeat; False if it was declared dead meanwhile (it must stop)."""
    result = session.execute(
        update(Worker).where(Worker.id == worker_id, Worker.stopped_at.is_(None)).values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def worker_progress(
    session: Session,
    worker_id: str,
    *,
    current_task: str | None | EllipsisType = ...,
    models: list[str],
    images: int,
    loads: int,
    swaps: int,
) -> None:
    """What a worker is doing, for `archfarm status` and the operator: task (`...` keeps it), resident models,
    counters."""
    values: dict[str, Any] = {
        "models": models,
        "images_done": Worker.images_done + images,
        "model_loads": loads,
        "stack_swaps": swaps,
    }
    if current_task is not ...:
        values["current_task"] = current_task
    session.execute(update(Worker).where(Worker.id == worker_id).values(**values))


def fail_queued(session: Session, task_id: str, reason: str) -> bool:
    """queued → failed, for a task that must not be sent again (it keeps killing its worker)."""
    return _transition(
        session, task_id, [TaskStatus.QUEUED], TaskStatus.FAILED, finished_at=utcnow(), error=reason[:MAX_ERROR_CHARS]
    )


def stop_worker(session: Session, worker_id: str) -> bool:
    result = session.execute(
        update(Worker).where(Worker.id == worker_id, Worker.stopped_at.is_(None)).values(stopped_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def reap(session: Session, timeout_s: float) -> list[str]:
    """Declare workers silent for `timeout_s` dead and requeue their running tasks; returns the task ids.

    Each dead worker is claimed by one conditional UPDATE, so concurrent reapers never double-send.
    """
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = session.scalars(select(Worker.id).where(Worker.stopped_at.is_(None), Worker.heartbeat_at < cutoff)).all()
    requeued: list[str] = []
    for worker_id in stale:
        if stop_worker(session, worker_id):
            requeued += requeue_held(session, worker_id)
    return requeued
