"""The embedded path: submit a job and render every task in this process, with no broker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select

from producer.database import open_database
from producer.submit import PreparedJob, persist, prepare
from shared.config import Settings
from shared.db.models import Task, TaskStatus
from shared.errors import TransientError
from shared.spec import JobSpec
from workers.runner import DoneFn, ProgressFn, Runner

log = logging.getLogger(__name__)

ROUNDS = 3
"""Passes over tasks handed back by a transient error (storage or database briefly away)."""
BACKOFF_S = 2.0


@dataclass
class LocalReport:
    job_id: str
    output_url: str
    statuses: dict[str, TaskStatus] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s is TaskStatus.SUCCEEDED for s in self.statuses.values())


def render_local(
    spec: JobSpec,
    settings: Settings,
    *,
    on_prepared: Callable[[PreparedJob], None] | None = None,
    on_task_done: DoneFn | None = None,
    progress: ProgressFn | None = None,
) -> LocalReport:
    """Validate (nothing stored on failure), persist, then run every task here in expansion order."""
    job = prepare(spec, settings)
    engine, sessions = open_database(settings)
    try:
        with sessions.begin() as session:
            persist(session, job)
        if on_prepared is not None:
            on_prepared(job)
        runner = Runner(settings, sessions, worker="local", on_done=on_task_done)
        pending = [task.id for task in job.tasks]
        for round_ in range(ROUNDS):
            for task_id in pending:
                try:
                    runner.run(task_id, progress)
                except TransientError as e:
                    log.warning("task %s handed back: %s", task_id, e)
            runner.flush()
            with sessions() as session:
                pending = list(
                    session.scalars(
                        select(Task.id)
                        .where(Task.job_id == job.id, Task.status == TaskStatus.QUEUED)
                        .order_by(Task.ordinal)
                    )
                )
            if not pending:
                break
            time.sleep(BACKOFF_S * (round_ + 1))
        runner.close()
        report = LocalReport(job_id=job.id, output_url=job.output_url)
        with sessions() as session:
            rows = session.execute(
                select(Task.id, Task.status, Task.error).where(Task.job_id == job.id).order_by(Task.ordinal)
            )
            for task_id, status, error in rows:
                report.statuses[task_id] = status
                if status is not TaskStatus.SUCCEEDED:
                    report.errors[task_id] = error or status.value
        return report
    finally:
        engine.dispose()
