"""Notification rows through their life: armed at submit, fired (or skipped) once the job shows whether the
event happened, then each attempt claimed, sent and recorded.

Every step is a conditional UPDATE whose row count says whether this caller won, as for tasks
(`shared.db.store`): workers noticing a job's end at once fire each event once, and two senders never hold
the same attempt. A claim holds its row for a lease on the database clock (the attempt's longest time), so a
sender that dies mid-attempt leaves it due again once the lease is over. `run` and `attempts` are the
claim's token: a late sender can never record over a newer attempt, nor over a run a retry has started.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, exists, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Exists

from shared.db.clock import aware, database_time, db_now
from shared.db.models import Job, Notification, NotificationState, PickGate, Task, TaskStatus
from shared.db.status import JobStatus
from shared.db.store import IN_FLIGHT, MAX_ERROR_CHARS, status_of
from shared.notify import body
from shared.spec import Notify

State = NotificationState


@dataclass(frozen=True)
class Claim:
    """One attempt this sender holds, with what to send."""

    id: int
    run: int
    attempt: int
    job_id: str
    event: str
    url: str
    body: str

    @property
    def delivery(self) -> str:
        """The same on every attempt of a run: what a receiver deduplicates by."""
        return delivery_id(self.id, self.run)


def delivery_id(notification: int, run: int) -> str:
    return f"{notification}.{run}"


def arm(session: Session, job_id: str, notify: Notify) -> None:
    """One row per event and URL, in the caller's transaction (the job's submit)."""
    rows = [
        {"job_id": job_id, "event": e, "url": u, "run": 0, "state": State.ARMED}
        for e in notify.events
        for u in notify.urls
    ]
    session.execute(insert(Notification), rows)


def rearm(session: Session, job_id: str) -> None:
    """Before a retry requeues a job's failed and cancelled tasks: its events start afresh, and one not yet
    delivered is superseded by the new run's. A retry with nothing to requeue changes nothing."""
    ended = (TaskStatus.FAILED, TaskStatus.CANCELLED)
    if not session.scalar(select(exists().where(Task.job_id == job_id, Task.status.in_(ended)))):
        return
    session.execute(update(Job).where(Job.id == job_id).values(expected_at=None))  # a new run, a new forecast
    session.execute(
        update(Notification)
        .where(Notification.job_id == job_id, Notification.state != State.ARMED)
        .values(
            state=State.ARMED,
            run=Notification.run + 1,
            body=None,
            attempts=0,
            next_attempt_at=None,
            fired_at=None,
            delivered_at=None,
            last_error=None,
        )
        .execution_options(synchronize_session=False)
    )


def verdict(event: str, outcome: JobStatus | None, failed: bool, at_risk: bool = False) -> bool | None:
    """Whether `event` happened (True), never will in this run (False) or may yet (None); `outcome` is the
    job's status once nothing is queued or running (else None), `failed` whether a task failed for good,
    `at_risk` whether the farm expected it to miss its deadline. A staged job waiting for a pick has not
    ended: only `pick_needed` happens then."""
    ended = outcome is not None and outcome.ended
    if event == "first_failure":
        return True if failed else (False if ended else None)
    if event == "deadline_at_risk":
        return True if at_risk else (False if ended else None)
    if event == "pick_needed":
        return True if outcome is JobStatus.WAITING_FOR_PICK else (False if ended else None)
    if not ended:
        return None
    return event == "finished" or outcome in (JobStatus.FAILED, JobStatus.PARTIALLY_SUCCEEDED)


def armed_job(session: Session, task_id: str) -> str | None:
    """The task's job if it has an armed event: one query per settled task, whether or not the job has any."""
    return session.scalar(
        select(Notification.job_id)
        .join(Task, Task.job_id == Notification.job_id)
        .where(Task.id == task_id, Notification.state == State.ARMED)
        .limit(1)
    )


def noticeable(session: Session, limit: int) -> list[str]:
    """Jobs with an armed event that may have happened: nothing left to run, a failure for `first_failure`, a
    forecast past the deadline for `deadline_at_risk`.
    One query, so every worker can afford it on every heartbeat."""

    def tasks_in(statuses: tuple[TaskStatus, ...]) -> Exists:
        return exists().where(Task.job_id == Notification.job_id, Task.status.in_(statuses))

    # A job waiting for a pick has nothing in flight, yet only its `pick_needed` may have happened: its other
    # events are left out, so that jobs waiting for days never crowd out the ones that ended.
    still = and_(
        ~tasks_in(IN_FLIGHT), or_(Job.gate.is_distinct_from(PickGate.OPEN), Notification.event == "pick_needed")
    )
    return list(
        session.scalars(
            select(Notification.job_id)
            .join(Job, Job.id == Notification.job_id)
            .where(
                Notification.state == State.ARMED,
                or_(
                    still,
                    and_(Notification.event == "first_failure", tasks_in((TaskStatus.FAILED,))),
                    and_(Notification.event == "deadline_at_risk", Job.expected_at.is_not(None)),
                ),
            )
            .distinct()
            .limit(limit)
        )
    )


def fire(session: Session, job_id: str, public_url: str | None) -> int:
    """Fire each armed event of the job that happened (its body fixed now) and skip each that never will;
    returns how many this call fired. Whoever fires a row first wins it; the others change nothing."""
    armed = session.execute(
        select(Notification.id, Notification.event, Notification.run)
        .where(Notification.job_id == job_id, Notification.state == State.ARMED)
        .order_by(Notification.id)  # every noticer locks a job's rows in one order
    ).all()
    if not armed:
        return 0
    job = session.get_one(Job, job_id)
    ended = not session.scalar(select(exists().where(Task.job_id == job_id, Task.status.in_(IN_FLIGHT))))
    state = status_of(session, job) if ended else None
    failure = None
    if any(event == "first_failure" for _, event, _ in armed):
        failure = session.execute(
            select(Task.error)
            .where(Task.job_id == job_id, Task.status == TaskStatus.FAILED)
            .order_by(Task.finished_at, Task.ordinal)
            .limit(1)
        ).first()
    now = database_time(session)
    # At risk: flagged by a forecast, or ended past its deadline without one (it ran late between two).
    late = job.deadline_at is not None and state is not None and state[0].ended and now > aware(job.deadline_at)
    at_risk = job.deadline_at is not None and (job.expected_at is not None or late)
    decided = [
        (row_id, event, run, happened)
        for row_id, event, run in armed
        if (happened := verdict(event, None if state is None else state[0], failure is not None, at_risk)) is not None
    ]
    if not decided:
        return 0
    status, counts = state or status_of(session, job)
    fired = 0
    for row_id, event, run, happened in decided:
        values: dict[str, object] = {"state": State.SKIPPED}
        if happened:
            sent = body(
                event=event,
                delivery=delivery_id(row_id, run),
                at=now,
                job_id=job_id,
                name=job.name,
                status=status.value,
                counts={s.value: counts.get(s, 0) for s in TaskStatus},
                public_url=public_url,
                error=None if event != "first_failure" or failure is None else failure[0] or "",
                deadline=(aware(job.deadline_at), aware(job.expected_at) if job.expected_at else now)
                if event == "deadline_at_risk" and job.deadline_at
                else None,
            )
            values = {"state": State.DUE, "body": sent, "fired_at": db_now(), "next_attempt_at": db_now()}
        result = session.execute(
            update(Notification)
            .where(Notification.id == row_id, Notification.run == run, Notification.state == State.ARMED)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        fired += int(happened and result.rowcount == 1)  # type: ignore[attr-defined]
    return fired


def due(session: Session, limit: int) -> list[tuple[int, int, int]]:
    """(id, run, attempts) of notifications whose next attempt is due, the longest waiting first."""
    rows = session.execute(
        select(Notification.id, Notification.run, Notification.attempts)
        .where(Notification.state == State.DUE, Notification.next_attempt_at <= db_now())
        .order_by(Notification.next_attempt_at)
        .limit(limit)
    )
    return [(row_id, run, attempts) for row_id, run, attempts in rows]


def undelivered(session: Session, job_id: str) -> list[tuple[str, str, str | None, float | None]]:
    """(event, url, last error, seconds until the next attempt; None: given up) of a job's fired events that
    have not been delivered."""
    now = database_time(session)
    rows = session.execute(
        select(Notification.event, Notification.url, Notification.last_error, Notification.next_attempt_at)
        .where(Notification.job_id == job_id, Notification.state.in_([State.DUE, State.ABANDONED]))
        .order_by(Notification.id)
    )
    return [
        (event, url, error, None if at is None else max(0.0, (aware(at) - now).total_seconds()))
        for event, url, error, at in rows
    ]


def claim(session: Session, row: tuple[int, int, int], lease_s: float) -> Claim | None:
    """Take the next attempt of a due notification for `lease_s` seconds; None when another sender has it."""
    row_id, run, attempts = row
    found = session.execute(
        update(Notification)
        .where(
            Notification.id == row_id,
            Notification.run == run,
            Notification.attempts == attempts,
            Notification.state == State.DUE,
            Notification.next_attempt_at <= db_now(),
        )
        .values(attempts=attempts + 1, next_attempt_at=db_now(lease_s))
        .returning(Notification.job_id, Notification.event, Notification.url, Notification.body)
        .execution_options(synchronize_session=False)
    ).first()
    if found is None:
        return None
    job_id, event, url, sent = found
    return Claim(row_id, run, attempts + 1, job_id, event, url, sent or "")


def delivered(session: Session, held: Claim) -> bool:
    return _record(session, held, state=State.DELIVERED, delivered_at=db_now(), next_attempt_at=None)


def failed(session: Session, held: Claim, error: str, retry_in: float | None) -> bool:
    """Record a failed attempt: tried again in `retry_in` seconds, or given up (None)."""
    if retry_in is None:
        return _record(session, held, state=State.ABANDONED, next_attempt_at=None, last_error=error[:MAX_ERROR_CHARS])
    return _record(session, held, next_attempt_at=db_now(retry_in), last_error=error[:MAX_ERROR_CHARS])


def _record(session: Session, held: Claim, **values: object) -> bool:
    result = session.execute(
        update(Notification)
        .where(
            Notification.id == held.id,
            Notification.run == held.run,
            Notification.attempts == held.attempt,
            Notification.state == State.DUE,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]
