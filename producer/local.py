"""The embedded path: submit a job and render every task in this process, with no broker.

The same lifecycle as a farm worker's (`workers.lifecycle`), over the in-process transport: one policy
decides every task's fate on both paths.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from producer.database import open_database
from producer.submit import PreparedJob, persist, prepare
from shared.config import Settings
from shared.db.models import Job, Task, TaskStatus
from shared.errors import SubmitWarning
from shared.spec import JobSpec
from workers.inprocess import InProcessQueue
from workers.lifecycle import DoneFn, Lifecycle, ProgressFn
from workers.notify import Notifier
from workers.policy import Limits

NOTIFY_PATIENCE_S = 10.0
"""How long a render waits at its end for notifications that failed to fall due again (one retry, by default):
someone is waiting for the command, and the database keeps the rest for a later sender."""


@dataclass
class LocalReport:
    job_id: str
    output_url: str
    statuses: dict[str, TaskStatus] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s is TaskStatus.SUCCEEDED for s in self.statuses.values())

    @property
    def succeeded(self) -> list[str]:
        """Tasks whose images were all written."""
        return [task_id for task_id, s in self.statuses.items() if s is TaskStatus.SUCCEEDED]


class Embedded:
    """The embedded farm: one database and one lifecycle for every job rendered in this process, so models
    stay resident from one job to the next (a program submitting many jobs loads each model once)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self._sessions = sessions
        self._engine: Engine | None = None
        self._queue = InProcessQueue()
        self.lifecycle: Lifecycle | None = None
        self.notifier: Notifier | None = None

    def render(
        self,
        spec: JobSpec,
        *,
        on_prepared: Callable[[PreparedJob], None] | None = None,
        on_task_done: DoneFn | None = None,
        progress: ProgressFn | None = None,
    ) -> LocalReport:
        """Validate (nothing stored on failure), persist, then run every task here in expansion order (a staged
        job's drafts, and the finals a rule picks; picks by hand are rendered by `run`)."""
        job = prepare(spec, self.settings)
        sessions = self._open()
        with sessions.begin() as session:
            persist(session, job)
        if on_prepared is not None:
            on_prepared(job)
        return self.run(job.id, [task.id for task in job.tasks], on_task_done=on_task_done, progress=progress)

    def run(
        self,
        job_id: str,
        task_ids: list[str],
        *,
        on_task_done: DoneFn | None = None,
        progress: ProgressFn | None = None,
    ) -> LocalReport:
        """Render stored tasks of a job here, and whatever they lead to (a rule's finals), then send the job's
        notifications that fell due."""
        sessions = self._open()
        if self.lifecycle is None:
            self.lifecycle = Lifecycle(
                self.settings,
                sessions,
                worker="local",
                node="local",
                send=self._queue.send,
                limits=Limits.in_process(self.settings),
            )
        lifecycle = self.lifecycle
        notifier = self.notifier = self.notifier or Notifier(self.settings, sessions)

        def done(task_id: str, status: TaskStatus) -> None:
            notifier.task_done(task_id, status)  # a first failure is told while the rest renders
            if on_task_done is not None:
                on_task_done(task_id, status)

        lifecycle.on_done = done
        self._queue.send(task_ids)
        self._queue.drain(lambda task_id: lifecycle.run(task_id, progress), lifecycle.flush)
        for problem in notifier.settle(job_id, NOTIFY_PATIENCE_S):
            warnings.warn(
                f"job {job_id}: {problem}; retried by the next render or worker on its database",
                SubmitWarning,
                stacklevel=2,
            )
        with sessions() as session:
            output_url = session.scalar(select(Job.output_url).where(Job.id == job_id)) or ""
        return self._report(job_id, output_url)

    def close(self) -> None:
        if self.lifecycle is not None:
            self.lifecycle.close()
        if self._engine is not None:
            self._engine.dispose()

    def _open(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._engine, self._sessions = open_database(self.settings)
        return self._sessions

    def _report(self, job_id: str, output_url: str) -> LocalReport:
        report = LocalReport(job_id=job_id, output_url=output_url)
        with self._open()() as session:
            rows = session.execute(
                select(Task.id, Task.status, Task.error).where(Task.job_id == job_id).order_by(Task.ordinal)
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
