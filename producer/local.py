"""The embedded path: submit a job and render every task in this process, with no broker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

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


class Embedded:
    """The embedded farm: one database and one runner for every job rendered in this process, so models
    stay resident from one job to the next (a program submitting many jobs loads each model once)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self._sessions = sessions
        self._engine: Engine | None = None
        self._runner: Runner | None = None

    def render(
        self,
        spec: JobSpec,
        *,
        on_prepared: Callable[[PreparedJob], None] | None = None,
        on_task_done: DoneFn | None = None,
        progress: ProgressFn | None = None,
    ) -> LocalReport:
        """Validate (nothing stored on failure), persist, then run every task here in expansion order."""
        job = prepare(spec, self.settings)
        sessions = self._open()
        with sessions.begin() as session:
            persist(session, job)
        if on_prepared is not None:
            on_prepared(job)
        if self._runner is None:
            self._runner = Runner(self.settings, sessions, worker="local")
        runner = self._runner
        runner.on_done = on_task_done
        pending = [task.id for task in job.tasks]
        for round_ in range(ROUNDS):
            for task_id in pending:
                try:
                    runner.run(task_id, progress)
                except TransientError as e:
                    log.warning("task %s handed back: %s", task_id, e)
            runner.flush()
            pending = self._queued(job.id)
            if not pending:
                break
            time.sleep(BACKOFF_S * (round_ + 1))
        return self._report(job)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        if self._engine is not None:
            self._engine.dispose()

    def _open(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._engine, self._sessions = open_database(self.settings)
        return self._sessions

    def _queued(self, job_id: str) -> list[str]:
        with self._open()() as session:
            return list(
                session.scalars(
                    select(Task.id)
                    .where(Task.job_id == job_id, Task.status == TaskStatus.QUEUED)
                    .order_by(Task.ordinal)
                )
            )

    def _report(self, job: PreparedJob) -> LocalReport:
        report = LocalReport(job_id=job.id, output_url=job.output_url)
        with self._open()() as session:
            rows = session.execute(
                select(Task.id, Task.status, Task.error).where(Task.job_id == job.id).order_by(Task.ordinal)
            )
            for task_id, status, error in rows:
                report.statuses[task_id] = status
                if status is not TaskStatus.SUCCEEDED:
                    report.errors[task_id] = error or status.value
        return report


def render_local(
    spec: JobSpec,
    settings: Settings,
    *,
    on_prepared: Callable[[PreparedJob], None] | None = None,
    on_task_done: DoneFn | None = None,
    progress: ProgressFn | None = None,
) -> LocalReport:
    """Render one job in this process (the `archfarm render` path)."""
    embedded = Embedded(settings)
    try:
        return embedded.render(spec, on_prepared=on_prepared, on_task_done=on_task_done, progress=progress)
    finally:
        embedded.close()
