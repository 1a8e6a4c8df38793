"""Submission: validate, expand and persist a job in one transaction.

Nothing is stored until the spec, every plan and the output URL have been checked; the job row and all its
task rows are then written together, so a failure leaves nothing half-submitted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import insert
from sqlalchemy.orm import Session

from producer.expand import TaskSpec, expand
from producer.plans import load_plans, stage_plans
from shared.config import Settings
from shared.db.models import Job, Task
from shared.spec import JobSpec
from shared.storage import canonical_url, open_storage_from_settings


@dataclass(frozen=True)
class PreparedJob:
    """A job that passed every check: ready to be stored and sent."""

    id: str
    spec: JobSpec
    output_url: str
    tasks: list[TaskSpec]


def prepare(spec: JobSpec, settings: Settings, *, stage: bool = False) -> PreparedJob:
    """Check the plans and the output URL and expand the task list; raises `InvalidInput` on any problem.

    With `stage`, local plans are copied into the configured storage once everything has been checked, so
    workers on other machines read the same bytes (content-addressed: a plan is stored once).
    """
    job_id = str(uuid.uuid4())
    output_url = canonical_url(spec.output or f"{settings.storage_url.rstrip('/')}/{job_id}")
    plans = load_plans(spec.plans, settings)
    if stage:
        plans = stage_plans(plans, open_storage_from_settings(settings))
    return PreparedJob(id=job_id, spec=spec, output_url=output_url, tasks=expand(spec, plans, job_id))


def persist(session: Session, job: PreparedJob) -> None:
    """Job row and task rows in the caller's transaction (the caller commits, then enqueues)."""
    session.add(
        Job(
            id=job.id,
            name=job.spec.name,
            priority=job.spec.priority,
            spec=job.spec.model_dump(mode="json"),
            profile_digest=job.spec.profile.digest(),
            output_url=job.output_url,
        )
    )
    session.flush()
    if job.tasks:
        session.execute(
            insert(Task),
            [
                {
                    "id": t.id,
                    "job_id": job.id,
                    "ordinal": ordinal,
                    "plan_url": t.plan.url,
                    "plan_name": t.plan.name,
                    "plan_digest": t.plan.digest,
                    "style": t.style,
                    "seeds": list(t.seeds),
                    "outputs": list(t.outputs),
                }
                for ordinal, t in enumerate(job.tasks)
            ],
        )
