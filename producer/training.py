"""A training spec submitted to a farm: one job of one task, run by one worker of its pool.

The task resumes from the run's latest checkpoint wherever it is delivered, so a worker that dies costs the
steps since that checkpoint, not the run. Checked before anything is stored: the spec, the dataset's
metadata (its files are the trainer's to check, row by row) and the output.
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass

from sqlalchemy.orm import Session

from producer.submit import check_output
from shared.config import Settings
from shared.db.clock import database_time
from shared.db.models import Task, TaskStatus
from shared.db.store import add_job
from shared.errors import InvalidInput, SubmitWarning
from shared.storage import canonical_url
from shared.training import TrainingSpec
from workers.training.dataset import Dataset


@dataclass(frozen=True)
class PreparedTraining:
    """A training job that passed every check: one task, ready to be stored and sent."""

    id: str
    task_id: str
    spec: TrainingSpec
    output_url: str
    queue: str
    owner: str | None = None

    @property
    def task_ids(self) -> list[str]:
        return [self.task_id]

    def persist(self, session: Session) -> None:
        persist_training(session, self)


def prepare_training(
    spec: TrainingSpec, settings: Settings, *, owner: str | None = None, remote: bool = False
) -> PreparedTraining:
    """Checked: the output, and the dataset's metadata from here (`remote` changes nothing: a training spec's
    model references are checked by the worker that trains)."""
    output_url = canonical_url(spec.output)
    check_output(output_url)
    dataset = Dataset(spec.train.dataset, settings)  # its metadata must be readable from here
    if not dataset.rows:
        raise InvalidInput(f"dataset {spec.train.dataset}: no usable rows ({len(dataset.problems)} bad)")
    if not spec.train.dataset.startswith("s3://"):
        warnings.warn(
            f"dataset {spec.train.dataset} is a local folder: every worker of pool {spec.pool!r} must see it there",
            SubmitWarning,
            stacklevel=2,
        )
    return PreparedTraining(
        id=str(uuid.uuid4()),
        task_id=str(uuid.uuid4()),
        spec=spec,
        output_url=output_url,
        queue=settings.queue_for(spec.pool),
        owner=owner,
    )


def persist_training(session: Session, job: PreparedTraining) -> None:
    """The job row and its one task, in the caller's transaction. The task names no plan, style or seed: what
    it does is its job's spec."""
    now = database_time(session)
    add_job(session, job_id=job.id, spec=job.spec, output_url=job.output_url, queue=job.queue, owner=job.owner)
    session.add(
        Task(id=job.task_id, job_id=job.id, ordinal=0, status=TaskStatus.QUEUED, attempts=0, created_at=now, due_at=now)
    )
