"""Re-rolls (`JobSpec.reroll`): an image that does not follow its plan is rendered again with the next seed of
its family, at most `times` times, and the best of its chain is kept.

Run in the transaction that records a task's images. A chain is an image rendered with the job's own seed (its
root) and its re-rolls (`reroll_of` = the root). Each image under the threshold whose chain has re-rolls left
adds one task, under an id derived from the chain and the attempt, so a redelivered task adds nothing new and
a chain cannot grow past `times` (it never loops). After every image, the chain's others point at its best so
far (`superseded_by`): whatever fails later, each chain has exactly one kept image, and none is deleted.
"""

from __future__ import annotations

import uuid

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session

from shared.db.clock import database_time
from shared.db.models import Artifact, Task, TaskStatus
from shared.db.store import add_tasks
from shared.plans import Plan, output_key
from shared.spec import JobSpec


def reroll(session: Session, job_id: str, spec: JobSpec, task_id: str) -> list[str]:
    """For a task just recorded: update its images' chains and add a re-roll task for each image under the
    job's threshold with re-rolls left. Returns the tasks added now, to be sent."""
    rule = spec.reroll
    if rule is None:
        return []
    task = session.execute(select(Task.plan_url, Task.plan_name).where(Task.id == task_id)).one()
    rows = []
    for image in session.scalars(select(Artifact).where(Artifact.task_id == task_id).order_by(Artifact.seed)):
        root = image.reroll_of or image.id
        chain = list(
            session.scalars(
                select(Artifact).where(or_(Artifact.id == root, Artifact.reroll_of == root)).order_by(Artifact.id)
            )
        )
        _keep_best(session, chain)
        attempt = len(chain)
        if image.adherence is None or image.adherence >= rule.below or attempt > rule.times:
            continue
        style = next(s for s in spec.resolved_styles if s.name == image.style)
        seed = spec.family(style).reroll(chain[0].seed, attempt)
        plan = Plan(task.plan_url, task.plan_name, image.plan_digest)
        rows.append(
            {
                "id": str(uuid.uuid5(uuid.UUID(job_id), f"reroll:{root}:{attempt}")),
                "plan_url": task.plan_url,
                "plan_name": task.plan_name,
                "plan_digest": image.plan_digest,
                "style": image.style,
                "seeds": [seed],
                "outputs": [output_key(plan, style.name, style.digest(), seed, spec.profile.digest())],
                "reroll_of": root,
            }
        )
    if not rows:
        return []
    now = database_time(session)
    ordinal = session.scalar(select(func.max(Task.ordinal)).where(Task.job_id == job_id)) or 0
    common = {"job_id": job_id, "status": TaskStatus.QUEUED.value, "attempts": 0, "created_at": now, "due_at": now}
    return add_tasks(session, [{**row, **common, "ordinal": ordinal + i} for i, row in enumerate(rows, start=1)])


def _keep_best(session: Session, chain: list[Artifact]) -> None:
    """Point every image of the chain but its best (highest adherence; the earliest of equals) at the best."""
    if len(chain) < 2:
        return
    best = max(chain, key=lambda a: (a.adherence or 0.0, -a.id))
    session.execute(
        update(Artifact)
        .where(Artifact.id.in_([a.id for a in chain]))
        .values(superseded_by=case((Artifact.id == best.id, None), else_=best.id))
        .execution_options(synchronize_session=False)
    )
