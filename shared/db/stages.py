"""A staged job's pick gate: picks, the final task each one adds, and the rule that picks alone.

A staged job (`JobSpec.staged`) is submitted with its drafts only, its gate open for picks by hand or left to
its rule (`by: adherence`). Each pick marks a draft artifact and adds one final task that names it
(`tasks.source_id`), sent at once, so finals render while a person is still choosing. An open gate closes by
hand (`archfarm pick --done`: `store.close_gate`), by a cancel, or when `pick.timeout` has passed (a worker's
upkeep); a rule's once every draft has ended and the rule has picked. Every change is a conditional UPDATE or
an insert of a deterministic id, so two pickers, or a rule run by two workers at once, add each final once.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Exists, exists, func, select, update
from sqlalchemy.orm import Session

from shared.db.clock import database_time
from shared.db.models import Artifact, Job, PickGate, Task, TaskStatus
from shared.db.store import add_tasks, close_gate
from shared.errors import InvalidInput, NotFound
from shared.spec import Pick

DRAFTS, FINALS = "drafts/", "finals/"


def pick(session: Session, job_id: str, artifact_ids: Sequence[int]) -> list[str]:
    """Pick drafts of a job whose gate is open: each gets a final task (one per draft, however often it is
    picked). Returns the final tasks added now, to be sent. InvalidInput for a closed gate or an id that is
    not a finished draft of this job."""
    job = _job(session, job_id)
    if job.gate is not PickGate.OPEN:
        raise InvalidInput(f"job {job_id} takes no picks: {_CLOSED_BECAUSE[job.gate]}")
    wanted = list(dict.fromkeys(artifact_ids))
    drafts = {
        artifact.id: artifact
        for artifact in session.scalars(
            select(Artifact).where(Artifact.job_id == job_id, Artifact.stage == "draft", Artifact.id.in_(wanted))
        )
    }
    unknown = [str(i) for i in wanted if i not in drafts]
    if unknown:
        raise InvalidInput(f"job {job_id} has no finished draft {', '.join(unknown[:5])}")
    return _add_finals(session, job, [drafts[i] for i in wanted])


def advance(session: Session, job_id: str) -> list[str]:
    """For a job picked by rule whose drafts have all ended: pick the best drafts of each group by adherence,
    close the gate, and return the finals added, to be sent. Nothing for any other job, or before then."""
    if session.scalar(select(Job.gate).where(Job.id == job_id)) is not PickGate.RULE or _drafting(session, job_id):
        return []
    if not close_gate(session, job_id, [PickGate.RULE]):
        return []  # another worker's rule got there first
    job = session.get_one(Job, job_id)
    rule = Pick.model_validate(job.spec["pick"])
    groups: dict[tuple[str, ...], list[Artifact]] = defaultdict(list)
    for artifact in session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.stage == "draft")):
        groups[tuple(getattr(artifact, _COLUMN[field]) for field in rule.per)].append(artifact)
    best = [
        artifact
        for group in groups.values()
        for artifact in sorted(group, key=lambda a: (-(a.adherence or 0.0), a.seed))[: rule.count]
    ]
    return _add_finals(session, job, best)


def ripe(session: Session, limit: int) -> list[str]:
    """Jobs whose rule may pick now (every draft ended): what a worker's upkeep advances when the worker that
    ended the last draft could not (it died first, or settled the draft while recovering from a crash)."""
    return list(session.scalars(select(Job.id).where(Job.gate == PickGate.RULE, ~_in_flight(Job.id)).limit(limit)))


def _drafting(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(_in_flight(job_id))))


def _in_flight(job_id: Any) -> Exists:
    """Whether a draft of the job is queued or running."""
    return exists().where(
        Task.job_id == job_id, Task.stage == "draft", Task.status.in_((TaskStatus.QUEUED, TaskStatus.RUNNING))
    )


_COLUMN = {"plan": "plan_digest", "style": "style"}
_CLOSED_BECAUSE = {
    None: "it has no stages",
    PickGate.RULE: "a rule picks its drafts",
    PickGate.CLOSED: "its picks are closed",
}


def final_task_id(job_id: str, draft_id: int) -> str:
    return str(uuid.uuid5(uuid.UUID(job_id), f"final:{draft_id}"))


def _add_finals(session: Session, job: Job, drafts: Sequence[Artifact]) -> list[str]:
    """Mark `drafts` picked and insert a final task for each that has none; the ids inserted now."""
    if not drafts:
        return []
    now = database_time(session)
    session.execute(
        update(Artifact)
        .where(Artifact.id.in_([d.id for d in drafts]), Artifact.picked_at.is_(None))
        .values(picked_at=now)
        .execution_options(synchronize_session=False)
    )
    sources = {
        row.id: row
        for row in session.execute(
            select(Task.id, Task.plan_url, Task.plan_name, Task.seeds, Task.outputs).where(
                Task.id.in_({d.task_id for d in drafts})
            )
        )
    }
    ordinal = session.scalar(select(func.max(Task.ordinal)).where(Task.job_id == job.id)) or 0
    rows = []
    for index, draft in enumerate(drafts, start=1):
        source = sources[draft.task_id]
        key = source.outputs[source.seeds.index(draft.seed)]
        rows.append(
            {
                "id": final_task_id(job.id, draft.id),
                "job_id": job.id,
                "ordinal": ordinal + index,
                "plan_url": source.plan_url,
                "plan_name": source.plan_name,
                "plan_digest": draft.plan_digest,
                "style": draft.style,
                "seeds": [draft.seed],
                "outputs": [FINALS + key.removeprefix(DRAFTS)],
                "stage": "final",
                "source_id": draft.id,
                "status": TaskStatus.QUEUED.value,
                "attempts": 0,
                "created_at": now,
                "due_at": now,
            }
        )
    return add_tasks(session, rows)


def _job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job
