"""State changes on tasks, jobs and workers.

Every transition is a conditional UPDATE (`WHERE status IN (...)`) whose row count says whether this caller
won: a duplicate delivery, a late worker or a concurrent cancel can never move a task backwards or count an
image twice. SQLite ignores `FOR UPDATE SKIP LOCKED`, so nothing here relies on row locks. Every time written
or compared comes from the database's clock (`db_now`), never from a host's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, true, update
from sqlalchemy.orm import Session, aliased

from shared.db.clock import aware, database_time, db_now
from shared.db.models import (
    Artifact,
    FailureKind,
    Job,
    JobCounts,
    JobKind,
    PickGate,
    Task,
    TaskFailure,
    TaskStatus,
    Worker,
)
from shared.db.session import dialect_insert
from shared.db.status import JobStatus, job_status
from shared.spec import JobSpec
from shared.training import TrainingSpec

MAX_ERROR_CHARS = 4000
IN_FLIGHT = (TaskStatus.QUEUED, TaskStatus.RUNNING)


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


def _claimed(worker: str) -> dict[str, Any]:
    return {"worker": worker, "attempts": Task.attempts + 1, "started_at": db_now(), "error": None}


def add_job(
    session: Session,
    *,
    job_id: str,
    spec: JobSpec | TrainingSpec,
    output_url: str,
    queue: str,
    owner: str | None,
) -> None:
    """The job row, of any kind, in the caller's transaction (its tasks follow in the same one); its kind,
    name, priority and digest are the spec's own."""
    session.add(
        Job(
            id=job_id,
            kind=JobKind(spec.kind),
            name=spec.name,
            priority=spec.priority,
            spec=spec.model_dump(mode="json"),
            digest=spec.digest(),
            output_url=output_url,
            queue=queue,
            owner=owner,
            gate=_gate(spec),
            picks_close_at=_picks_close_at(session, spec),
            # In UTC: SQLite keeps a time's wall clock and drops its offset.
            deadline_at=spec.deadline.astimezone(UTC) if isinstance(spec, JobSpec) and spec.deadline else None,
        )
    )
    session.flush()


def _gate(spec: JobSpec | TrainingSpec) -> PickGate | None:
    """A staged job's gate at submit: open for picks by hand, left to the rule otherwise."""
    if not isinstance(spec, JobSpec) or spec.pick is None:
        return None
    return PickGate.RULE if spec.pick.by == "adherence" else PickGate.OPEN


def _picks_close_at(session: Session, spec: JobSpec | TrainingSpec) -> datetime | None:
    """When picks by hand close by themselves: `pick.timeout` hours from now, by the database's clock."""
    if not isinstance(spec, JobSpec) or spec.pick is None or spec.pick.by != "hand" or spec.pick.timeout is None:
        return None
    return database_time(session) + timedelta(hours=spec.pick.timeout)


def close_expired_gates(session: Session) -> list[str]:
    """Close every open pick gate whose `pick.timeout` has passed; the jobs closed (each ends with its finals)."""
    expired = update(Job).where(Job.gate == PickGate.OPEN, Job.picks_close_at <= db_now())
    return list(session.scalars(expired.values(gate=PickGate.CLOSED).returning(Job.id)))


def claim_task(session: Session, task_id: str, worker: str) -> bool:
    """queued → running for `worker`; False when another worker, a cancel or a finish got there first."""
    return _transition(session, task_id, [TaskStatus.QUEUED], TaskStatus.RUNNING, **_claimed(worker))


def claim_more(
    session: Session, job_id: str, worker: str, limit: int, stage: str | None = None, style: str | None = None
) -> list[str]:
    """Up to `limit` more queued tasks of a job's `stage` (drafts and finals render at different sizes) and, given
    one, `style` (a style pack's LoRA and mood board are one per call) for `worker` to render in the same call,
    in expansion order, none that is waiting out a delay. Their own messages find them taken (or done) and do
    nothing."""
    ids = list(
        session.scalars(
            select(Task.id)
            .join(Job, Job.id == Task.job_id)
            .where(
                Task.job_id == job_id,
                Task.status == TaskStatus.QUEUED,
                Task.stage.is_(None) if stage is None else Task.stage == stage,
                true() if style is None else Task.style == style,
                Task.due_at <= db_now(),
                Job.paused_at.is_(None),
            )
            .order_by(Task.ordinal)
            .limit(limit)
        )
    )
    if not ids:
        return []
    claimed = set(
        session.scalars(
            update(Task)
            .where(Task.id.in_(ids), Task.status == TaskStatus.QUEUED)
            .values(status=TaskStatus.RUNNING, **_claimed(worker))
            .returning(Task.id)
            .execution_options(synchronize_session=False)
        )
    )
    return [task_id for task_id in ids if task_id in claimed]


def finish_task(session: Session, task_id: str, worker: str) -> bool:
    """running → succeeded, only for the worker that holds the task."""
    return _transition(
        session, task_id, [TaskStatus.RUNNING], TaskStatus.SUCCEEDED, held_by=worker, finished_at=db_now()
    )


def fail_task(session: Session, task_id: str, worker: str | None, error: str) -> bool:
    """running (for `worker`) or, with no worker, queued → failed, with the reason stored on the row."""
    frm = [TaskStatus.RUNNING] if worker is not None else [TaskStatus.QUEUED]
    return _transition(
        session, task_id, frm, TaskStatus.FAILED, held_by=worker, finished_at=db_now(), error=error[:MAX_ERROR_CHARS]
    )


def cancel_task(session: Session, task_id: str, worker: str) -> bool:
    """running → cancelled, for the holding worker, once it has stopped rendering for a cancel."""
    return _transition(
        session, task_id, [TaskStatus.RUNNING], TaskStatus.CANCELLED, held_by=worker, finished_at=db_now()
    )


def requeue_task(session: Session, task_id: str, worker: str, delay_s: float = 0.0) -> bool:
    """running → queued for the holding worker; its next message is due `delay_s` from now. A delayed task
    waits without a message (held) until then: the dispatch sends it once due, so no broker holds a
    countdown (a worker holding one hoards it; quorum queues have none)."""
    return _transition(
        session,
        task_id,
        [TaskStatus.RUNNING],
        TaskStatus.QUEUED,
        held_by=worker,
        worker=None,
        started_at=None,
        due_at=db_now(delay_s),
        **({"dispatched_at": None} if delay_s > 0 else {}),
    )


def postpone_task(session: Session, task_id: str, delay_s: float) -> bool:
    """A queued task is handed on: held, without a message, until `delay_s` from now, when the dispatch sends
    it again for whichever worker takes it."""
    result = session.execute(
        update(Task)
        .where(Task.id == task_id, Task.status == TaskStatus.QUEUED)
        .values(due_at=db_now(delay_s), dispatched_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def requeue_held(session: Session, worker: str) -> list[str]:
    """Every task running for `worker` back to queued (it died or is stopping); ids to send again now."""
    return list(
        session.scalars(
            update(Task)
            .where(Task.worker == worker, Task.status == TaskStatus.RUNNING)
            .values(status=TaskStatus.QUEUED, worker=None, started_at=None, due_at=db_now())
            .returning(Task.id)
            .execution_options(synchronize_session=False)
        )
    )


def held_by(session: Session, worker: str) -> list[tuple[str, str]]:
    """(task id, job id) of every task running for `worker`."""
    rows = session.execute(
        select(Task.id, Task.job_id).where(Task.worker == worker, Task.status == TaskStatus.RUNNING)
    ).all()
    return [(task_id, job_id) for task_id, job_id in rows]


def record_failure(session: Session, task_id: str, job_id: str, node: str, kind: FailureKind, error: str) -> None:
    """Store one failed attempt of `kind`."""
    session.add(
        TaskFailure(
            task_id=task_id, job_id=job_id, node=node, kind=kind, error=error[:MAX_ERROR_CHARS], created_at=db_now()
        )
    )
    session.flush()


@dataclass(frozen=True)
class FailureCounts:
    """Per failure kind: attempts, distinct nodes, and seconds since the first of them (database clock)."""

    attempts: dict[FailureKind, int]
    nodes: dict[FailureKind, int]
    age_s: dict[FailureKind, float]


def failure_counts(session: Session, task_id: str) -> FailureCounts:
    rows = session.execute(
        select(
            TaskFailure.kind,
            func.count(),
            func.count(func.distinct(TaskFailure.node)),
            func.min(TaskFailure.created_at),
        )
        .where(TaskFailure.task_id == task_id)
        .group_by(TaskFailure.kind)
    ).all()
    now = database_time(session) if rows else None
    return FailureCounts(
        attempts={FailureKind(kind): int(n) for kind, n, _, _ in rows},
        nodes={FailureKind(kind): int(nodes) for kind, _, nodes, _ in rows},
        age_s={
            FailureKind(kind): (now - aware(first)).total_seconds() for kind, _, _, first in rows if now is not None
        },
    )


def blocklisted_nodes(session: Session, job_id: str, limit: int) -> set[str]:
    """Nodes that failed `limit` distinct tasks of a job whose plans other nodes render: they stop taking
    that job's tasks.

    Only evidence that the node is at fault counts: an error a task raised (a crash, a shutdown or an outage
    says nothing about the node) on a plan of which another node has stored an image (that very task
    retried elsewhere, or another task of the plan). A failure every node shares, such as an input no node
    can read, blames none of them."""
    rendered, holder = aliased(Task), aliased(Worker)
    rendered_elsewhere = (
        select(Artifact.id)
        .join(rendered, rendered.id == Artifact.task_id)
        .join(holder, holder.id == rendered.worker)
        .where(Artifact.job_id == job_id, Artifact.plan_digest == Task.plan_digest, holder.node != TaskFailure.node)
        .exists()
    )
    rows = session.execute(
        select(TaskFailure.node)
        .join(Task, Task.id == TaskFailure.task_id)
        .where(TaskFailure.job_id == job_id, TaskFailure.kind == FailureKind.ERROR, rendered_elsewhere)
        .group_by(TaskFailure.node)
        .having(func.count(func.distinct(TaskFailure.task_id)) >= limit)
    )
    return set(rows.scalars())


def failed_on(session: Session, task_id: str) -> set[str]:
    """Nodes on which this task raised an error: its next attempt goes to another node while one may take it."""
    rows = session.scalars(
        select(TaskFailure.node).where(TaskFailure.task_id == task_id, TaskFailure.kind == FailureKind.ERROR).distinct()
    )
    return set(rows)


def last_error(session: Session, job_id: str, node: str) -> str:
    """The latest error a task of the job raised on `node`: why the node was blocklisted."""
    error = session.scalar(
        select(TaskFailure.error)
        .where(TaskFailure.job_id == job_id, TaskFailure.node == node, TaskFailure.kind == FailureKind.ERROR)
        .order_by(TaskFailure.id.desc())
        .limit(1)
    )
    return error or ""


def fail_queued(session: Session, job_id: str, error: str, plan_digest: str | None = None) -> list[str]:
    """Every queued task of a job, or of one of its plans, → failed with `error`: the tasks that share an input
    no node can read. Returns their ids."""
    stmt = update(Task).where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED)
    if plan_digest is not None:
        stmt = stmt.where(Task.plan_digest == plan_digest)
    values = {"status": TaskStatus.FAILED, "finished_at": db_now(), "error": error[:MAX_ERROR_CHARS]}
    return list(session.scalars(stmt.values(**values).returning(Task.id).execution_options(synchronize_session=False)))


def serving_workers(session: Session, job: Job, heartbeat_timeout_s: float, blocklist_after: int | None) -> int:
    """Live workers (a recent heartbeat) that consume the job's queue and are not blocklisted for it: none
    means the job's queued tasks wait for a worker to start, whatever an ETA would say."""
    blocked = set() if blocklist_after is None else blocklisted_nodes(session, job.id, blocklist_after)
    rows = session.execute(
        select(Worker.node, Worker.queues).where(
            Worker.stopped_at.is_(None), Worker.heartbeat_at >= db_now(-heartbeat_timeout_s)
        )
    )
    return sum(1 for node, queues in rows if job.queue in queues and node not in blocked)


def live_nodes(session: Session, queue: str) -> set[str]:
    """Nodes with a worker that has not stopped and consumes `queue`."""
    rows = session.execute(select(Worker.node, Worker.queues).where(Worker.stopped_at.is_(None)))
    return {node for node, queues in rows if queue in queues}


def cancel_job(session: Session, job_id: str) -> int | None:
    """Mark the job cancelled and cancel its queued tasks; running ones stop at their next step; a staged job's
    gate closes.

    Returns the tasks cancelled now, or None when the job had nothing left to run and no gate open (it stays
    as it ended)."""
    in_flight = session.scalar(
        select(func.count()).select_from(Task).where(Task.job_id == job_id, Task.status.in_(IN_FLIGHT))
    )
    if not close_gate(session, job_id) and not in_flight:
        return None
    session.execute(update(Job).where(Job.id == job_id, Job.cancelled_at.is_(None)).values(cancelled_at=db_now()))
    result = session.execute(
        update(Task)
        .where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED)
        .values(status=TaskStatus.CANCELLED, finished_at=db_now())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def close_gate(session: Session, job_id: str, gates: Sequence[PickGate] = (PickGate.OPEN, PickGate.RULE)) -> bool:
    """Close a staged job's pick gate if it is one of `gates`: no more picks, and the job ends once its finals
    do. False when it was not (closed already, by a person, a cancel or another worker's rule, or no stages)."""
    gate = update(Job).where(Job.id == job_id, Job.gate.in_(gates))
    return bool(session.execute(gate.values(gate=PickGate.CLOSED)).rowcount)  # type: ignore[attr-defined]


def retry_job(session: Session, job_id: str) -> list[str]:
    """Failed and cancelled tasks back to queued, and with every queued one back to waiting for its turn
    (`shared.dispatch` sends them: a message lost with a broker is sent again too); returns their ids.

    The job's failure history goes too: a retry says the cause was fixed, so no worker stays blocklisted.
    """
    session.execute(update(Job).where(Job.id == job_id).values(cancelled_at=None))
    session.execute(delete(TaskFailure).where(TaskFailure.job_id == job_id))
    session.execute(
        update(Task)
        .where(Task.job_id == job_id, Task.status.in_([TaskStatus.FAILED, TaskStatus.CANCELLED]))
        .values(status=TaskStatus.QUEUED, error=None, worker=None, started_at=None, finished_at=None)
        .execution_options(synchronize_session=False)
    )
    return list(
        session.scalars(
            update(Task)
            .where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED)
            .values(due_at=db_now(), dispatched_at=None)
            .returning(Task.id)
            .execution_options(synchronize_session=False)
        )
    )


def pause_job(session: Session, job_id: str) -> bool:
    """Hold the job's queued tasks back; running ones finish. False when it was paused already."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.paused_at.is_(None)).values(paused_at=db_now()))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def resume_job(session: Session, job_id: str) -> None:
    """Let the job's queued tasks run again: they take their turn (`shared.dispatch`); those whose messages
    were spent while it was paused were held again by the workers that drew them."""
    session.execute(update(Job).where(Job.id == job_id).values(paused_at=None))


def set_priority(session: Session, job_id: str, priority: int) -> None:
    """The job's new priority: its held tasks take their turn at it, and so do its sent ones, held again to be
    sent at it (their old messages find the tasks taken, or run them first: either way each runs once)."""
    session.execute(update(Job).where(Job.id == job_id).values(priority=priority))
    session.execute(
        update(Task)
        .where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED, Task.dispatched_at.is_not(None))
        .values(dispatched_at=None)
        .execution_options(synchronize_session=False)
    )


def is_paused(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.paused_at).where(Job.id == job_id)) is not None


def is_cancelled(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.cancelled_at).where(Job.id == job_id)) is not None


def job_counts(session: Session, job_id: str) -> JobCounts:
    """The job's counts as the database keeps them (all zero before its first task is stored)."""
    query = select(JobCounts).where(JobCounts.job_id == job_id).execution_options(populate_existing=True)
    found = session.scalar(query)  # fresh: the triggers change it behind the session's back
    return found or JobCounts(job_id=job_id, **dict.fromkeys(("finals", "images", *(s.value for s in TaskStatus)), 0))


def task_counts(session: Session, job_id: str) -> dict[TaskStatus, int]:
    return job_counts(session, job_id).by_status()


def status_of(session: Session, job: Job) -> tuple[JobStatus, dict[TaskStatus, int]]:
    counts = task_counts(session, job.id)
    return status_from(job, counts), counts


def status_from(job: Job, counts: dict[TaskStatus, int]) -> JobStatus:
    """A job row's status given its task counts."""
    return job_status(counts, job.cancelled_at is not None, job.paused_at is not None, job.gate is PickGate.OPEN)


def add_tasks(session: Session, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Insert task rows added to a running job (a pick's finals, an upscale's assembly, a re-roll), each under an
    id derived from what it is: one already there is left alone. Returns the ids inserted now, to be sent at
    once (so they are marked dispatched: a few tasks that continue a job need no turn)."""
    now = database_time(session)
    dispatched = [{**row, "dispatched_at": now} for row in rows]
    inserted = dialect_insert(session, Task).values(dispatched).on_conflict_do_nothing(index_elements=["id"])
    return list(session.scalars(inserted.returning(Task.id)))


def record_artifacts(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert artifact rows; a redelivered task rewrote the same objects, so a conflict updates in place."""
    if not rows:
        return
    stmt = dialect_insert(session, Artifact).values(list(rows))
    stmt = stmt.on_conflict_do_update(
        index_elements=["job_id", "stage", "plan_digest", "style", "seed"],
        set_={
            c: stmt.excluded[c]
            for c in (
                "task_id",
                "url",
                "sidecar_url",
                "width",
                "height",
                "size_bytes",
                "adherence",
                "look",
                "parent_id",
                "reroll_of",
                "seam",
            )
        },
    )
    session.execute(stmt)


def register_worker(session: Session, worker_id: str, node: str, device: str, pid: int, queues: list[str]) -> None:
    session.add(
        Worker(
            id=worker_id,
            node=node,
            device=device,
            pid=pid,
            queues=queues,
            started_at=db_now(),
            heartbeat_at=db_now(),
            idle_since=db_now(),
        )
    )


def mark_ready(session: Session, worker_id: str, warmed: list[dict[str, Any]], memory_bytes: int) -> None:
    """The worker's pool process takes tasks from now on, having warmed `warmed` (a replacement pool process,
    after a crash, warms and marks it again), with `memory_bytes` of device memory for model stacks."""
    session.execute(
        update(Worker).where(Worker.id == worker_id).values(ready_at=db_now(), warmed=warmed, memory_bytes=memory_bytes)
    )


def largest_memory(session: Session, queue: str, other_than: str) -> int | None:
    """The most device memory a live worker consuming `queue`, other than `other_than`, offers (0: there is
    none); None while one of them has not said (its pool process is still starting or warming)."""
    rows = session.execute(
        select(Worker.memory_bytes, Worker.queues).where(Worker.stopped_at.is_(None), Worker.id != other_than)
    )
    offers = [memory for memory, queues in rows if queue in queues]
    return None if None in offers else max(offers, default=0)


def heartbeat(session: Session, worker_id: str) -> bool:
    """Refresh a live worker's heartbeat; False if it was declared dead meanwhile (it must stop)."""
    result = session.execute(
        update(Worker).where(Worker.id == worker_id, Worker.stopped_at.is_(None)).values(heartbeat_at=db_now())
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def worker_progress(
    session: Session,
    worker_id: str,
    *,
    started: str | None = None,
    finished: str | None = None,
    models: list[str],
    images: int,
    loads: int,
    swaps: int,
) -> None:
    """What a worker is doing, for `archfarm status` and the operator: the task it `started`, or that it
    `finished` one (idle from now, unless it has started the next meanwhile), resident models, counters."""
    values: dict[str, Any] = {
        "models": models,
        "images_done": Worker.images_done + images,
        "model_loads": loads,
        "stack_swaps": swaps,
    }
    if started is not None:
        values.update(current_task=started, idle_since=None)
    session.execute(update(Worker).where(Worker.id == worker_id).values(**values))
    if finished is not None:
        session.execute(
            update(Worker)
            .where(Worker.id == worker_id, Worker.current_task == finished)
            .values(current_task=None, idle_since=db_now())
        )


def record_progress(session: Session, task_id: str, worker: str, progress: dict[str, Any]) -> bool:
    """A running task's progress (training: step, loss, rate), written only by the worker holding it."""
    result = session.execute(
        update(Task)
        .where(Task.id == task_id, Task.worker == worker, Task.status == TaskStatus.RUNNING)
        .values(progress=progress)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def stop_worker(session: Session, worker_id: str) -> bool:
    result = session.execute(
        update(Worker).where(Worker.id == worker_id, Worker.stopped_at.is_(None)).values(stopped_at=db_now())
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def reap(session: Session, timeout_s: float) -> list[str]:
    """Declare workers silent for `timeout_s` dead and requeue their running tasks; returns the task ids.

    Each dead worker is claimed by one conditional UPDATE, so concurrent reapers never double-send.
    """
    stale = session.scalars(
        select(Worker.id).where(Worker.stopped_at.is_(None), Worker.heartbeat_at < db_now(-timeout_s))
    ).all()
    requeued: list[str] = []
    for worker_id in stale:
        if stop_worker(session, worker_id):
            requeued += requeue_held(session, worker_id)
    return requeued


def idle_queues(session: Session, idle_s: float) -> set[str]:
    """Queues that a live worker has consumed for `idle_s` seconds without holding a task.

    Such a worker would have taken any message waiting in them, so a task queued there and due long ago
    has no message left (it was lost with a broker, a submit or a worker): the sweeper's evidence.
    """
    rows = session.scalars(
        select(Worker.queues).where(Worker.stopped_at.is_(None), Worker.idle_since < db_now(-idle_s))
    )
    return {queue for queues in rows for queue in queues}


@dataclass(frozen=True)
class Delivery:
    """The task a live worker was handed last and renders now: the queue it came from, its job's priority,
    when its message fell due and when the worker took it (database clock)."""

    queue: str
    priority: int
    due_at: datetime
    taken_at: datetime


def deliveries(session: Session) -> list[Delivery]:
    """What each busy live worker took last: the broker hands out messages in order, so a message taken after
    another fell due says that one was gone (the sweeper's evidence while the workers are busy)."""
    rows = session.execute(
        select(Job.queue, Job.priority, Task.due_at, Task.started_at)
        .select_from(Worker)
        .join(Task, Task.id == Worker.current_task)
        .join(Job, Job.id == Task.job_id)
        .where(Worker.stopped_at.is_(None), Task.status == TaskStatus.RUNNING, Task.worker == Worker.id)
    )
    return [Delivery(queue, priority, aware(due), aware(taken)) for queue, priority, due, taken in rows if taken]


@dataclass(frozen=True)
class Stranded:
    """Where tasks without a message are: queued on `queue`, of jobs at priorities `lowest`-`highest`, due
    before `due_before` (database clock)."""

    queue: str
    due_before: datetime
    lowest: int = 0
    highest: int = 100


def sweep(session: Session, stranded: Sequence[Stranded], limit: int) -> list[str]:
    """Up to `limit` queued tasks that `stranded` describes, highest priority first, marked due now; returns
    their ids, to be sent again. Concurrent sweepers never take the same task."""
    if not stranded:
        return []
    where = or_(
        *(
            and_(Job.queue == s.queue, Task.due_at < s.due_before, Job.priority.between(s.lowest, s.highest))
            for s in stranded
        )
    )
    ids = list(
        session.scalars(
            select(Task.id)
            .join(Job, Job.id == Task.job_id)
            .where(
                Task.status == TaskStatus.QUEUED,
                Task.dispatched_at.is_not(None),  # a held task has no message by design: it waits its turn
                Job.paused_at.is_(None),  # a paused job's tasks wait without messages; resume sends them
                where,
            )
            .order_by(Job.priority.desc(), Task.ordinal)
            .limit(limit)
        )
    )
    if not ids:
        return []
    latest = max(s.due_before for s in stranded)  # a concurrent sweeper marks its tasks due now, past it
    return list(
        session.scalars(
            update(Task)
            .where(Task.id.in_(ids), Task.status == TaskStatus.QUEUED, Task.due_at < latest)
            .values(due_at=db_now())
            .returning(Task.id)
            .execution_options(synchronize_session=False)
        )
    )
