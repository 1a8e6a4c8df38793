"""Deadlines: when the farm expects each job done, and the jobs it expects to miss theirs.

A pool's live workers each do one GPU-second of work per second. The forecast serves a pool's jobs in the
order a top-up takes an owner's (`shared.db.shares`: priority, then deadline, then age), so a job ends once
its own work left (`shared.db.costs`) and that of every job ahead of it are done. Fair share between owners
reorders jobs across owners; the forecast leaves that out, so with several owners sharing a pool it errs
late for the jobs of the owner with less work and early for the others'. A paused job, and a pool with no
live worker (scaled to zero, say), have no forecast, and nothing is flagged for them: the first worker up
forecasts again. A job first found at risk keeps the finish forecast then (`jobs.expected_at`), which fires
its `deadline_at_risk` notification once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import Session

from shared.db.clock import aware, database_time
from shared.db.costs import remaining
from shared.db.models import Job, JobCounts
from shared.db.shares import TURN_ORDER
from shared.dispatch import live_workers


@dataclass(frozen=True)
class Forecast:
    expected_at: datetime
    deadline_at: datetime | None

    @property
    def at_risk(self) -> bool:
        return self.deadline_at is not None and self.expected_at > self.deadline_at


def forecast(session: Session, heartbeat_timeout: float, queues: Iterable[str] | None = None) -> dict[str, Forecast]:
    """The forecast of every unfinished, unpaused render job (of `queues`, or all) whose pool has a live
    worker, by job id."""
    waiting = select(Job.id).join(JobCounts, JobCounts.job_id == Job.id).where(JobCounts.queued + JobCounts.running > 0)
    if queues is not None:
        waiting = waiting.where(Job.queue.in_(list(queues)))
    left = remaining(session, list(session.scalars(waiting)))
    rows = session.execute(
        select(Job.id, Job.queue, Job.deadline_at)
        .where(Job.id.in_(list(left)), Job.paused_at.is_(None), Job.cancelled_at.is_(None))
        .order_by(*TURN_ORDER)
    )
    live = live_workers(session, heartbeat_timeout)
    now = database_time(session)
    ahead: dict[str, float] = defaultdict(float)
    found = {}
    for job_id, queue, deadline_at in rows:
        ahead[queue] += left[job_id].seconds
        if live[queue]:
            expected = now + timedelta(seconds=ahead[queue] / live[queue])
            found[job_id] = Forecast(expected, None if deadline_at is None else aware(deadline_at))
    return found


def flag_at_risk(session: Session, heartbeat_timeout: float) -> list[str]:
    """Record the forecast of each job newly expected to miss its deadline; returns their ids. Costs one
    query while no unfinished job with a deadline is unflagged."""
    unflagged = and_(
        exists().where(JobCounts.job_id == Job.id, JobCounts.queued + JobCounts.running > 0),
        Job.deadline_at.is_not(None),
        Job.expected_at.is_(None),
    )
    queues = set(session.scalars(select(Job.queue).where(unflagged).distinct()))
    if not queues:
        return []
    flagged = []
    for job_id, found in forecast(session, heartbeat_timeout, queues).items():
        if found.at_risk:
            marked = session.execute(
                update(Job).where(Job.id == job_id, Job.expected_at.is_(None)).values(expected_at=found.expected_at)
            )
            if marked.rowcount:  # type: ignore[attr-defined]
                flagged.append(job_id)
    return flagged
