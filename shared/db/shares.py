"""Fair share between owners, and their daily quotas, in GPU-seconds of the cost model.

A pool's workers are shared by owners (the API token's name of each job; "" for the CLI and Python), not by
jobs: one artist's 20,000-image job must not hold the pool until it drains. When a queue is topped up
(`shared.dispatch`) and several owners have tasks waiting, each free place in the window goes to the owner
whose GPU-seconds over its weight (`ARCHFARM_SHARES`) are lowest: its tasks finished in the last
`ARCHFARM_SHARE_WINDOW` seconds plus those in flight (sent or running), each costed by its job's profile.
So an owner's share of the work tracks its weight whatever the size or number of its jobs, and a newcomer
is served at once until it has caught up. Within an owner, jobs take turns by priority, then deadline
(earliest first), then age.

An owner with a quota (`ARCHFARM_QUOTAS`, GPU-seconds per 24 hours) that has spent it gets no place: its
queued tasks wait, without a message, until the work of its last 24 hours falls below the quota, and a job
it submits meanwhile is refused. The check is made per top-up, so an owner just under its quota may go over
it by what one window holds. Training jobs cost 0 here (one task runs for hours on a GPU of its own).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db.clock import db_now
from shared.db.costs import per_task
from shared.db.models import Job, JobCounts, Task, TaskStatus
from shared.errors import QuotaSpent

DAY_S = 24 * 3600.0
TURN_ORDER = (Job.priority.desc(), Job.deadline_at.is_(None), Job.deadline_at, Job.created_at, Job.id)
"""An owner's jobs in turn: priority, then the earliest deadline, then age (the forecast serves them so too)."""


@dataclass(frozen=True)
class Waiting:
    """A job of the queue with tasks waiting for a message, in its owner's turn order."""

    job_id: str
    owner: str
    held: int
    cost: float
    """GPU-seconds of one of its tasks."""


def allocate(room: int, waiting: Iterable[Waiting], used: dict[str, float], weights: dict[str, float]) -> list[str]:
    """The jobs of the next `room` messages, in the order they go out: each to the owner whose GPU-seconds
    (`used`, counting what this allocation gives it) over its weight are the lowest (ties: by name), from its
    first job with tasks left."""
    jobs: dict[str, list[Waiting]] = defaultdict(list)
    for job in waiting:
        if job.held > 0:
            jobs[job.owner].append(job)
    left = {job.job_id: job.held for owned in jobs.values() for job in owned}
    turn = [(used.get(owner, 0.0) / weights[owner], owner) for owner in jobs]
    heapq.heapify(turn)
    picked: list[str] = []
    while turn and len(picked) < room:
        spent, owner = heapq.heappop(turn)
        job = jobs[owner][0]
        picked.append(job.job_id)
        left[job.job_id] -= 1
        if not left[job.job_id]:
            jobs[owner].pop(0)
        if jobs[owner]:
            heapq.heappush(turn, (spent + job.cost / weights[owner], owner))
    return picked


def turns(session: Session, settings: Settings, queue: str, window: int) -> list[str]:
    """The jobs of the messages that fill the queue up to its `window`, one entry per message, in the order
    they go out."""
    sent = _sent(session, queue)
    room = window - sum(sent.values())
    if room <= 0:
        return []
    rows = session.execute(
        select(Job.id, Job.owner, JobCounts.queued)
        .join(JobCounts, JobCounts.job_id == Job.id)
        .where(Job.queue == queue, JobCounts.queued > 0, Job.paused_at.is_(None), Job.cancelled_at.is_(None))
        .order_by(*TURN_ORDER)
    ).all()
    owners = {owner or "" for _, owner, _ in rows}
    spent = [owner for owner in owners if owner in settings.quotas and over_quota(session, settings, owner)]
    later = _not_due(session, queue)
    costs = per_task(session, [job_id for job_id, _, _ in rows]) if len(owners) > 1 else {}
    waiting = [
        Waiting(job_id, owner or "", queued - sent.get(job_id, 0) - later.get(job_id, 0), costs.get(job_id, 0.0))
        for job_id, owner, queued in rows
        if (owner or "") not in spent
    ]
    used = usage(session, settings, queue, sent) if len(owners - set(spent)) > 1 else {}
    return allocate(room, waiting, used, {owner: settings.share_of(owner) for owner in owners})


def usage(session: Session, settings: Settings, queue: str, sent: dict[str, int]) -> dict[str, float]:
    """Each owner's GPU-seconds in the queue: its tasks that ran in the share window, and those in flight
    (running, or `sent`: the queue's tasks with a message, per job)."""
    counts = _ran(session, Job.queue == queue, settings.share_window)
    for job_id, tasks in sent.items():
        counts[job_id] += tasks
    return _costed(session, counts)


def over_quota(session: Session, settings: Settings, owner: str | None) -> bool:
    """Whether the owner has a quota and has spent it over the last 24 hours."""
    quota = settings.quotas.get(owner or "")
    return quota is not None and spent_today(session, owner) >= quota


def check_quota(session: Session, settings: Settings, owner: str | None) -> None:
    """Refuse a new job of an owner that has spent its quota (`QuotaSpent`), before anything is stored."""
    quota = settings.quotas.get(owner or "")
    if quota is not None and (spent := spent_today(session, owner)) >= quota:
        raise QuotaSpent(
            f"owner {owner or '(local)'!r} has used {spent:,.0f} of its {quota:,.0f} GPU-seconds of the last 24 "
            "hours: submit again once earlier work has aged out of them"
        )


def spent_today(session: Session, owner: str | None) -> float:
    """The owner's GPU-seconds over the last 24 hours, across pools: its tasks that ran, and those running."""
    mine = Job.owner.is_(None) if not owner else Job.owner == owner
    return sum(_costed(session, _ran(session, mine, DAY_S)).values())


def _ran(session: Session, scope: ColumnElement[bool], since_s: float) -> defaultdict[str, int]:
    """Per job in `scope`: its tasks that ran and finished in the last `since_s` seconds, and those running."""
    counts: defaultdict[str, int] = defaultdict(int)
    finished = session.execute(
        select(Task.job_id, func.count())
        .join(Job, Job.id == Task.job_id)
        .where(scope, Task.finished_at >= db_now(-since_s), Task.started_at.is_not(None))  # a cancel ran nothing
        .group_by(Task.job_id)
    )
    running = session.execute(
        select(JobCounts.job_id, JobCounts.running)
        .join(Job, Job.id == JobCounts.job_id)
        .where(scope, JobCounts.running > 0)
    )
    for job_id, tasks in [*finished, *running]:
        counts[job_id] += tasks
    return counts


def _costed(session: Session, tasks: dict[str, int]) -> dict[str, float]:
    """GPU-seconds per owner of so many tasks per job."""
    costs = per_task(session, tasks)
    owners = {
        job_id: owner for job_id, owner in session.execute(select(Job.id, Job.owner).where(Job.id.in_(list(tasks))))
    }
    used: dict[str, float] = defaultdict(float)
    for job_id, count in tasks.items():
        used[owners[job_id] or ""] += count * costs[job_id]
    return dict(used)


def _not_due(session: Session, queue: str) -> dict[str, int]:
    """The queue's queued tasks waiting out a delay (a retry's backoff, a hand-on), per job: no place in a
    window goes to them before they are due. Read through the (status, due) index: the delayed ones alone."""
    rows = session.execute(
        select(Task.job_id, func.count())
        .join(Job, Job.id == Task.job_id)
        .where(Task.status == TaskStatus.QUEUED, Task.due_at > db_now(), Job.queue == queue)
        .group_by(Task.job_id)
    )
    return {job_id: count for job_id, count in rows}


def over_quota_owners(session: Session, settings: Settings) -> set[str]:
    """Owners with a quota they have spent: their queued tasks are held, not backlog a new worker could take."""
    return {owner for owner in settings.quotas if over_quota(session, settings, owner)}


def _sent(session: Session, queue: str) -> dict[str, int]:
    """The queue's queued tasks with a message, per job: read through the sent tasks' partial index (a window's
    worth), whatever the size of the jobs."""
    rows = session.execute(
        select(Task.job_id, func.count())
        .join(Job, Job.id == Task.job_id)
        .where(Job.queue == queue, Task.status == TaskStatus.QUEUED, Task.dispatched_at.is_not(None))
        .group_by(Task.job_id)
    )
    return {job_id: count for job_id, count in rows}
