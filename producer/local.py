"""The embedded path: submit a job and render every task in this process, with no broker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select

from producer.database import open_database
from producer.submit import PreparedJob, persist, prepare
from shared.config import Settings
from shared.db.models import Task, TaskStatus
from shared.spec import JobSpec
from workers.runner import ProgressFn, Runner


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
    on_task_done: Callable[[str, TaskStatus], None] | None = None,
    progress: ProgressFn | None = None,
) -> LocalReport:
    """Validate (nothing stored on failure), persist, then run the tasks in order, highest priority first."""
    job = prepare(spec, settings)
    engine, sessions = open_database(settings)
    try:
        with sessions.begin() as session:
            persist(session, job)
        if on_prepared is not None:
            on_prepared(job)
        runner = Runner(settings, sessions, worker="local")
        report = LocalReport(job_id=job.id, output_url=job.output_url)
        for task in job.tasks:
            status = runner.run(task.id, progress)
            report.statuses[task.id] = status
            if on_task_done is not None:
                on_task_done(task.id, status)
        with sessions() as session:
            failed = select(Task.id, Task.error).where(Task.job_id == job.id, Task.status == TaskStatus.FAILED)
            report.errors = {task_id: error or "" for task_id, error in session.execute(failed)}
        return report
    finally:
        engine.dispose()
