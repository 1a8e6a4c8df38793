"""Dispatch: a job's tasks go to the broker a window at a time, not all at its submit.

A job of a million tasks is stored at once, but its messages are sent only as far ahead of the workers as
they need: each queue holds at most a window of messages (`window`: a few per live worker that consumes it,
at least `MIN_WINDOW`, so small jobs go out whole and a starting worker finds work). The rest wait in the
database, queued with no message (`tasks.dispatched_at` null: held), where a pause, a priority change, a
cancel, fair share and deadlines act on them directly. Whoever tops a queue up takes its next held tasks in
turn (`shared.db.shares`): owners by their fair share, an owner's jobs by priority, deadline and age, a job's
tasks in expansion order. Top-ups run at submit (the first window), on resume, retry and priority changes,
and on every worker's heartbeat (`workers.upkeep`). Marking tasks dispatched and sending their messages are
two steps: a send that fails leaves dispatched tasks without a message, which the sweeper finds like any
message lost with a broker.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Iterable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db.clock import db_now
from shared.db.models import Job, JobCounts, Task, TaskStatus, Worker
from shared.db.shares import turns

MIN_WINDOW = 64
"""Messages a queue may hold whatever its workers: a small job goes out whole at its submit."""
WINDOW_PER_WORKER = 8
"""Messages a queue holds per live worker that consumes it: a worker renders for many seconds per task and
claims a batch's worth beside its message, so a few ahead keep it busy between two heartbeats' top-ups."""


def window(workers: int) -> int:
    """How many messages a queue consumed by `workers` live workers may hold."""
    return max(MIN_WINDOW, workers * WINDOW_PER_WORKER)


def top_up(session: Session, settings: Settings, queues: Iterable[str] | None = None) -> list[str]:
    """Mark the next held tasks of each of `queues` (every queue with held tasks by default) dispatched, up to
    its window, in the owners' and jobs' turns (`shared.db.shares`); returns their ids, to be sent once this
    transaction commits."""
    live = live_workers(session, settings.heartbeat_timeout)
    picked: list[str] = []
    for queue in sorted(set(queues) if queues is not None else _waiting_queues(session)):
        picked += _take(session, settings, queue, window(live[queue]))
    return picked


def live_workers(session: Session, heartbeat_timeout: float) -> Counter[str]:
    """Live workers (a recent heartbeat) per queue they consume."""
    rows = session.scalars(
        select(Worker.queues).where(Worker.stopped_at.is_(None), Worker.heartbeat_at >= db_now(-heartbeat_timeout))
    )
    return Counter(queue for queues in rows for queue in queues)


def hold(session: Session, task_ids: Iterable[str]) -> None:
    """Queued tasks whose messages were spent without running them (their job was paused): back to waiting
    for their turn, without a message."""
    session.execute(
        update(Task)
        .where(Task.id.in_(list(task_ids)), Task.status == TaskStatus.QUEUED)
        .values(dispatched_at=None)
        .execution_options(synchronize_session=False)
    )


def _waiting_queues(session: Session) -> list[str]:
    """Queues of jobs that have queued tasks and may run (not paused, not cancelled)."""
    query = (
        select(Job.queue)
        .join(JobCounts, JobCounts.job_id == Job.id)
        .where(JobCounts.queued > 0, Job.paused_at.is_(None), Job.cancelled_at.is_(None))
        .distinct()
    )
    return list(session.scalars(query))


def _take(session: Session, settings: Settings, queue: str, window: int) -> list[str]:
    if session.get_bind().dialect.name == "postgresql" and not session.scalar(
        select(func.pg_try_advisory_xact_lock(_lock_key(queue)))
    ):
        return []  # another process is topping this queue up now
    order = turns(session, settings, queue, window)
    held = {
        job_id: deque(
            session.scalars(
                select(Task.id)
                .where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED, Task.dispatched_at.is_(None))
                .where(Task.due_at <= db_now())  # a retry's or a hand-on's delay not yet over: it waits
                .order_by(Task.ordinal)
                .limit(count)
            )
        )
        for job_id, count in Counter(order).items()
    }
    picked = [held[job_id].popleft() for job_id in order if held[job_id]]
    if not picked:
        return []
    marked = set(
        session.scalars(
            update(Task)
            .where(Task.id.in_(picked), Task.status == TaskStatus.QUEUED, Task.dispatched_at.is_(None))
            .values(dispatched_at=db_now(), due_at=db_now())
            .returning(Task.id)
            .execution_options(synchronize_session=False)
        )
    )
    return [task_id for task_id in picked if task_id in marked]  # in turn order


def _lock_key(queue: str) -> int:
    """The queue's PostgreSQL advisory lock: one top-up of a queue at a time across the farm."""
    return int.from_bytes(hashlib.sha256(f"archfarm-dispatch:{queue}".encode()).digest()[:8], "big", signed=True)
