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
from shared.db.models import Job, Task, TaskStatus
from shared.errors import InvalidInput, SubmitWarning
from shared.storage import canonical_url
from shared.training import TrainingSpec
from workers.training.dataset import Dataset

TRAIN_STYLE = "train"
"""A training task's `style` column: what lists and sheets show in place of a style."""


@dataclass(frozen=True)
class PreparedTraining:
    id: str
    task_id: str
    spec: TrainingSpec
    output_url: str
    queue: str
    owner: str | None = None


def prepare_training(spec: TrainingSpec, settings: Settings, owner: str | None = None) -> PreparedTraining:
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
    """The job row and its one task, in the caller's transaction."""
    now = database_time(session)
    session.add(
        Job(
            id=job.id,
            name=job.spec.name,
            priority=job.spec.priority,
            spec=job.spec.model_dump(mode="json"),
            profile_digest=job.spec.digest(),
            output_url=job.output_url,
            queue=job.queue,
            owner=job.owner,
        )
    )
    session.flush()
    session.add(
        Task(
            id=job.task_id,
            job_id=job.id,
            ordinal=0,
            plan_url=job.spec.train.dataset,
            plan_name="dataset",
            plan_digest=job.spec.digest(),
            style=TRAIN_STYLE,
            seeds=[job.spec.train.seed],
            outputs=[job.output_url],
            status=TaskStatus.QUEUED,
            attempts=0,
            created_at=now,
            due_at=now,
        )
    )
