"""State on SQLite and on the real PostgreSQL: persistence, conditional transitions, derived job status."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from producer.expand import TaskSpec, expand
from producer.submit import PreparedJob, persist
from shared.config import Settings
from shared.db.clock import database_time, db_now
from shared.db.models import Artifact, Base, Job, JobKind, Task, TaskStatus, Worker
from shared.db.session import make_engine, session_factory, upgrade
from shared.db.status import JobStatus, job_status
from shared.db.store import (
    Stranded,
    add_tasks,
    cancel_job,
    cancel_task,
    claim_task,
    deliveries,
    fail_task,
    finish_task,
    heartbeat,
    idle_queues,
    job_counts,
    pause_job,
    postpone_task,
    reap,
    record_artifacts,
    register_worker,
    requeue_task,
    resume_job,
    retry_job,
    set_priority,
    status_of,
    sweep,
    task_counts,
    worker_progress,
)
from shared.dispatch import MIN_WINDOW, top_up
from shared.plans import Plan
from shared.spec import JobSpec
from workers.upkeep import stranded

JOB_ID = "0b9f6a52-8d3e-4f4e-9d0c-7a1b2c3d4e5f"
FARM = Settings(heartbeat_timeout=60)
PLAN = Plan(url="file:///plans/ground.png", name="ground", digest="d" * 64)


def prepared(job_id: str = JOB_ID, seeds: int = 3) -> PreparedJob:
    spec = JobSpec.model_validate(
        {
            "name": "villa",
            "plans": [PLAN.url],
            "styles": ["modern"],
            "seeds": {"count": seeds},
            "profile": "tiny",
        }
    )
    return PreparedJob(
        id=job_id, spec=spec, output_url="file:///out", queue="archfarm", tasks=expand(spec, [PLAN], job_id)
    )


@pytest.fixture
def job(sessions: sessionmaker[Session]) -> PreparedJob:
    job = prepared()
    with sessions.begin() as session:
        persist(session, job)
    return job


def status(sessions: sessionmaker[Session], job_id: str = JOB_ID) -> tuple[JobStatus, dict[TaskStatus, int]]:
    with sessions() as session:
        return status_of(session, session.get_one(Job, job_id))


def test_migrations_match_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert diff == []


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_upgrading_gives_every_stored_job_its_kind_and_drops_training_placeholders(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Jobs stored before kinds existed: a training job (told by its spec's `train` mapping, once, by the
    migration) becomes kind train and its task loses the plan, style and seed it stood in with; every row
    survives SQLite's rebuilding of the tables."""
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("fresh_database")
    engine = make_engine(url)
    upgrade(engine, "0008")
    with engine.begin() as connection:
        for job_id, spec, style in (("j-render", {"plans": []}, "modern"), ("j-train", {"train": {}}, "train")):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, name, priority, spec, profile_digest, output_url, queue, created_at) "
                    "VALUES (:id, 'old', 50, :spec, 'd', 'file:///out', 'archfarm', CURRENT_TIMESTAMP)"
                ),
                {"id": job_id, "spec": json.dumps(spec)},
            )
            connection.execute(
                text(
                    "INSERT INTO tasks (id, job_id, ordinal, plan_url, plan_name, plan_digest, style, seeds, outputs, "
                    "status, attempts, created_at, due_at) VALUES (:id, :job, 0, 'file:///p.png', 'dataset', 'x', "
                    ":style, '[0]', '[]', 'queued', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"id": f"t-{job_id}", "job": job_id, "style": style},
            )
        connection.execute(
            text(
                "INSERT INTO artifacts (job_id, task_id, plan_digest, style, seed, url, sidecar_url, width, height, "
                "size_bytes, created_at) VALUES ('j-render', 't-j-render', 'x', 'modern', 0, 'u', 's', 8, 8, 1, "
                "CURRENT_TIMESTAMP)"
            )
        )
    upgrade(engine)  # rebuilds tables on SQLite: nothing that refers to them may go with the old copies
    with session_factory(engine)() as session:
        assert dict(session.execute(select(Job.id, Job.kind)).all()) == {
            "j-render": JobKind.RENDER,
            "j-train": JobKind.TRAIN,
        }
        rows = dict(session.execute(select(Task.job_id, Task.style)).all())
        assert rows == {"j-render": "modern", "j-train": None}
        assert session.scalar(select(Job.digest).where(Job.id == "j-render")) == "d"
        assert session.scalar(select(func.count()).select_from(Artifact)) == 1
    engine.dispose()


def test_persist_stores_job_and_every_task(sessions: sessionmaker[Session], job: PreparedJob) -> None:
    with sessions() as session:
        tasks = session.scalars(select(Task).order_by(Task.ordinal)).all()
        assert [t.seeds for t in tasks] == [[0], [1], [2]]
        assert all(t.status is TaskStatus.QUEUED and t.attempts == 0 for t in tasks)
        assert session.get_one(Job, JOB_ID).spec["styles"][0]["name"] == "modern"
    assert status(sessions) == (JobStatus.QUEUED, {TaskStatus.QUEUED: 3})


def test_a_task_is_claimed_once_and_finished_only_by_its_holder(
    sessions: sessionmaker[Session], job: PreparedJob
) -> None:
    task_id = job.tasks[0].id
    with sessions.begin() as session:
        assert claim_task(session, task_id, "w1")
        assert not claim_task(session, task_id, "w2")  # duplicate delivery
    assert status(sessions)[0] is JobStatus.RUNNING
    with sessions.begin() as session:
        assert not finish_task(session, task_id, "w2")
        assert finish_task(session, task_id, "w1")
        assert not finish_task(session, task_id, "w1")  # a second finish changes nothing
        assert not claim_task(session, task_id, "w2")  # done stays done
    with sessions() as session:
        row = session.get_one(Task, task_id)
        assert (row.status, row.attempts, row.worker) == (TaskStatus.SUCCEEDED, 1, "w1")


def test_outcomes(sessions: sessionmaker[Session], job: PreparedJob) -> None:
    a, b, c = (t.id for t in job.tasks)
    with sessions.begin() as session:
        for task_id in (a, b, c):
            claim_task(session, task_id, "w")
        finish_task(session, a, "w")
        fail_task(session, b, "w", "ModelError: no such model")
        requeue_task(session, c, "w")  # handed back on shutdown
    assert status(sessions) == (
        JobStatus.RUNNING,
        {TaskStatus.SUCCEEDED: 1, TaskStatus.FAILED: 1, TaskStatus.QUEUED: 1},
    )
    with sessions.begin() as session:
        assert claim_task(session, c, "w2")
        fail_task(session, c, "w2", "boom")
    assert status(sessions)[0] is JobStatus.PARTIALLY_SUCCEEDED
    with sessions.begin() as session:
        assert sorted(retry_job(session, JOB_ID)) == sorted([b, c])
        assert session.get_one(Task, b).error is None
    assert status(sessions)[0] is JobStatus.RUNNING


def test_cancel_stops_queued_tasks_and_running_ones_cannot_finish_as_queued(
    sessions: sessionmaker[Session], job: PreparedJob
) -> None:
    a = job.tasks[0].id
    with sessions.begin() as session:
        claim_task(session, a, "w")
        assert cancel_job(session, JOB_ID) == 2
    with sessions.begin() as session:
        assert not claim_task(session, job.tasks[1].id, "w")  # a cancelled task never starts
        cancel_task(session, a, "w")
    assert status(sessions) == (JobStatus.CANCELLED, {TaskStatus.CANCELLED: 3})
    with sessions.begin() as session:
        assert len(retry_job(session, JOB_ID)) == 3
    assert status(sessions)[0] is JobStatus.QUEUED


def test_job_counts_follow_every_change_of_its_tasks_whoever_makes_it(
    sessions: sessionmaker[Session], job: PreparedJob
) -> None:
    """The counts the triggers keep equal a count of the rows after claims, finishes, failures, hand-backs, a
    reap, a cancel of many at once, a retry, tasks added to a running job and images stored (twice: a
    redelivered task's images are updated, not counted again); the first start is the earliest claim's."""

    def check(session: Session) -> None:
        rows = session.execute(select(Task.status, func.count()).where(Task.job_id == JOB_ID).group_by(Task.status))
        assert task_counts(session, JOB_ID) == {TaskStatus(status): count for status, count in rows}
        counts = job_counts(session, JOB_ID)
        images = select(func.count()).select_from(Artifact).where(Artifact.job_id == JOB_ID)
        finals = select(func.count()).select_from(Task).where(Task.job_id == JOB_ID, Task.stage == "final")
        assert (counts.images, counts.finals) == (session.scalar(images), session.scalar(finals))

    a, b, c = (t.id for t in job.tasks)
    steps = [
        lambda s: [claim_task(s, t, "w") for t in (a, b)],
        lambda s: (finish_task(s, a, "w"), fail_task(s, b, "w", "boom")),
        lambda s: (claim_task(s, c, "gone"), heartbeat(s, "gone")),
        lambda s: record_artifacts(s, [_artifact(job.tasks[0], seed) for seed in (0, 1)]),
        lambda s: record_artifacts(s, [_artifact(job.tasks[0], seed) for seed in (0, 1, 2)]),
        lambda s: s.execute(update(Worker).where(Worker.id == "gone").values(heartbeat_at=db_now(-600))),
        lambda s: reap(s, 60),
        lambda s: add_tasks(s, [_final(job, "f1"), _final(job, "f2")]),
        lambda s: cancel_job(s, JOB_ID),
        lambda s: retry_job(s, JOB_ID),
        lambda s: requeue_task(s, c, "nobody"),
    ]
    with sessions.begin() as session:
        register_worker(session, "gone", "node", "cpu", 1, ["archfarm"])
        check(session)
    for step in steps:
        with sessions.begin() as session:
            step(session)
            check(session)
    with sessions() as session:
        assert job_counts(session, JOB_ID).started_at is not None  # the first claim's, kept through the retry


def _artifact(task: TaskSpec, seed: int) -> dict[str, object]:
    return {
        "job_id": JOB_ID,
        "task_id": task.id,
        "plan_digest": task.plan.digest,
        "style": task.style,
        "seed": seed,
        "url": f"file:///out/{seed}.png",
        "sidecar_url": f"file:///out/{seed}.json",
        "width": 8,
        "height": 8,
        "size_bytes": 1,
    }


def _final(job: PreparedJob, name: str) -> dict[str, object]:
    task = job.tasks[0]
    return {
        "id": str(uuid.uuid5(uuid.UUID(JOB_ID), name)),
        "job_id": JOB_ID,
        "ordinal": 100 + len(name),
        "plan_url": task.plan.url,
        "plan_name": task.plan.name,
        "plan_digest": task.plan.digest,
        "style": task.style,
        "seeds": [0],
        "outputs": [f"finals/{name}.png"],
        "stage": "final",
        "status": TaskStatus.QUEUED.value,
        "attempts": 0,
    }


def test_artifacts_are_unique_per_image(sessions: sessionmaker[Session], job: PreparedJob) -> None:
    task = job.tasks[0]
    row = {
        "job_id": JOB_ID,
        "task_id": task.id,
        "plan_digest": PLAN.digest,
        "style": "modern",
        "seed": 0,
        "url": "file:///out/a.png",
        "sidecar_url": "file:///out/a.json",
        "width": 8,
        "height": 8,
        "size_bytes": 1,
    }
    with sessions.begin() as session:
        record_artifacts(session, [row])
    with sessions.begin() as session:  # a redelivered task writes the same image again
        record_artifacts(session, [{**row, "size_bytes": 2}])
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Artifact)) == 1
        assert session.scalar(select(Artifact.size_bytes)) == 2


def test_two_jobs_with_identical_inputs_do_not_collide(sessions: sessionmaker[Session], job: PreparedJob) -> None:
    other = prepared("5a4d3c2b-1a09-4876-9543-210fedcba987")
    with sessions.begin() as session:
        persist(session, other)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Task)) == 6


@pytest.mark.parametrize(
    ("counts", "cancelled", "expected"),
    [
        ({TaskStatus.QUEUED: 2}, False, JobStatus.QUEUED),
        ({TaskStatus.QUEUED: 1, TaskStatus.SUCCEEDED: 1}, False, JobStatus.RUNNING),
        ({TaskStatus.RUNNING: 1, TaskStatus.CANCELLED: 1}, True, JobStatus.RUNNING),
        ({TaskStatus.SUCCEEDED: 2}, False, JobStatus.SUCCEEDED),
        ({TaskStatus.FAILED: 2}, False, JobStatus.FAILED),
        ({TaskStatus.SUCCEEDED: 1, TaskStatus.FAILED: 1}, False, JobStatus.PARTIALLY_SUCCEEDED),
        ({TaskStatus.SUCCEEDED: 1, TaskStatus.CANCELLED: 1}, True, JobStatus.CANCELLED),
        ({TaskStatus.CANCELLED: 2}, True, JobStatus.CANCELLED),
    ],
)
def test_job_status_is_derived(counts: dict, cancelled: bool, expected: JobStatus) -> None:
    assert job_status(counts, cancelled) is expected


def test_sqlite_file_upgrades_from_nothing(tmp_path: Path) -> None:
    from producer.database import open_database
    from shared.config import Settings

    engine, sessions = open_database(Settings(database_url=f"sqlite:///{tmp_path / 'fresh.db'}"))
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    engine.dispose()


def test_cancelling_a_finished_job_leaves_it_as_it_ended(sessions: sessionmaker[Session], job: PreparedJob) -> None:
    with sessions.begin() as session:
        for task in job.tasks:
            claim_task(session, task.id, "w")
            finish_task(session, task.id, "w")
        assert cancel_job(session, JOB_ID) is None
    assert status(sessions)[0] is JobStatus.SUCCEEDED


def backdate(sessions: sessionmaker[Session], seconds: float, *, tasks: bool = False, workers: bool = False) -> None:
    """Move due times and idle times into the past, as a stretch of waiting would."""
    with sessions.begin() as session:
        if tasks:
            session.execute(update(Task).values(due_at=db_now(-seconds)))
        if workers:
            session.execute(update(Worker).values(idle_since=db_now(-seconds), heartbeat_at=db_now(-seconds)))


def stranded_now(session: Session, after_s: float) -> list[Stranded]:
    """What a worker's sweeper reads as evidence of lost messages, at this moment."""
    return stranded(idle_queues(session, after_s), deliveries(session), database_time(session), after_s)


def test_the_sweeper_resends_overdue_tasks_only_while_a_worker_on_their_queue_idles(
    sessions: sessionmaker[Session], job: PreparedJob
) -> None:
    with sessions.begin() as session:
        register_worker(session, "w#1", "w", "cpu", 1, ["archfarm"])
        register_worker(session, "other#1", "other", "cpu", 2, ["other-queue"])
        assert idle_queues(session, 60) == set()  # just started: idle, but not for long
    backdate(sessions, 600, tasks=True, workers=True)
    with sessions.begin() as session:
        assert sweep(session, stranded_now(session, 60), 100) == []  # held: no message to lose, it waits its turn
        assert len(top_up(session, FARM)) == 3  # sent
    backdate(sessions, 600, tasks=True, workers=True)
    with sessions.begin() as session:
        assert idle_queues(session, 60) == {"archfarm", "other-queue"}
        now = database_time(session)
        assert sweep(session, [Stranded("other-queue", now)], 100) == []  # the job's tasks are on another queue
        where = stranded_now(session, 60)
        first = sweep(session, where, 2)
        second = sweep(session, where, 100)
        assert len(first) == 2 and len(second) == 1 and not set(first) & set(second)
        assert sweep(session, stranded_now(session, 60), 100) == []  # each is due again now: nothing overdue
        claim_task(session, job.tasks[0].id, "w#1")
        worker_progress(session, "w#1", started=job.tasks[0].id, models=[], images=0, loads=0, swaps=0)
        assert idle_queues(session, 60) == {"other-queue"}  # busy, so its queue proves nothing


URGENT_ID = "1c8e5b41-7c2d-4e3d-8cbf-6b0a1d2c3e4f"


def take(session: Session, worker: str, task_id: str) -> None:
    """A worker handed a task's message: claimed, and its current task."""
    claim_task(session, task_id, worker)
    worker_progress(session, worker, started=task_id, models=[], images=0, loads=0, swaps=0)


@pytest.mark.parametrize("background_priority", [10, 90], ids=["lower-priority", "same-priority"])
def test_tasks_a_busy_worker_passed_over_are_resent_most_urgent_first(
    sessions: sessionmaker[Session], background_priority: int
) -> None:
    """An urgent job's messages were lost (a broker restarted without persistence) while the workers keep busy
    on another job: a worker taking a message that sorts after the urgent tasks' (a lower priority, or the same
    one sent later) proves theirs gone, so they are sent again without waiting for an idle worker."""
    urgent = dataclasses.replace(prepared(URGENT_ID), spec=prepared().spec.model_copy(update={"priority": 90}))
    background = dataclasses.replace(
        prepared(seeds=4), spec=prepared().spec.model_copy(update={"priority": background_priority})
    )
    with sessions.begin() as session:
        persist(session, urgent)
        persist(session, background)
        register_worker(session, "w#1", "w", "cpu", 1, ["archfarm"])
        assert len(top_up(session, FARM)) == 7
        take(session, "w#1", background.tasks[0].id)
        assert sweep(session, stranded_now(session, 60), 100) == []  # the urgent tasks fell due just now
    with sessions.begin() as session:  # ten minutes on: the urgent job's messages are gone
        session.execute(update(Task).where(Task.job_id == URGENT_ID).values(due_at=db_now(-600)))
        session.execute(update(Task).where(Task.job_id == JOB_ID).values(due_at=db_now(-120)))
        take(session, "w#1", background.tasks[1].id)  # a message that fell due after theirs, taken before them
        swept = sweep(session, stranded_now(session, 60), 100)
        assert sorted(swept) == sorted(t.id for t in urgent.tasks)  # the background's own are not overdue
        assert sweep(session, stranded_now(session, 60), 100) == []  # sent: due now


def test_tasks_are_sent_a_window_at_a_time_in_turn_and_what_waits_obeys_pauses_and_priorities(
    sessions: sessionmaker[Session],
) -> None:
    """A queue holds at most its window of messages (`MIN_WINDOW` with few workers); a top-up fills it by job
    priority, then age, then expansion order; a claim makes room; a paused job's tasks wait; a priority change
    and a retry send a job's queued tasks again in turn; nothing held, or paused, is swept."""
    big = dataclasses.replace(prepared(seeds=100), spec=prepared().spec.model_copy(update={"priority": 50}))
    urgent = dataclasses.replace(
        prepared(URGENT_ID, seeds=10), spec=prepared().spec.model_copy(update={"priority": 90})
    )
    with sessions.begin() as session:
        persist(session, big)
        persist(session, urgent)
        register_worker(session, "w#1", "w", "cpu", 1, ["archfarm"])
        first = top_up(session, FARM)
        assert first == [t.id for t in urgent.tasks] + [t.id for t in big.tasks[: MIN_WINDOW - 10]]
        assert top_up(session, FARM) == []  # full
        for task in big.tasks[:5]:
            claim_task(session, task.id, "w#1")  # claimed without its message: a batch's extra tasks
        assert top_up(session, FARM) == [t.id for t in big.tasks[MIN_WINDOW - 10 : MIN_WINDOW - 5]]
        claim_task(session, urgent.tasks[0].id, "w#1")
        pause_job(session, JOB_ID)
        assert top_up(session, FARM) == []  # the room is there, but the only job with tasks waiting is paused
    backdate(sessions, 600, tasks=True, workers=True)
    with sessions.begin() as session:
        swept = sweep(session, stranded_now(session, 60), 1000)  # the sent ones of jobs not paused: the urgent's
        assert sorted(swept) == sorted(t.id for t in urgent.tasks[1:])
        set_priority(session, JOB_ID, 95)
        resume_job(session, JOB_ID)
        again = top_up(session, FARM)  # the big job's sent tasks were held again: sent again first, at 95
        assert again[0] == big.tasks[5].id and len(again) == MIN_WINDOW - 9
        assert len(retry_job(session, URGENT_ID)) == 9
        assert again == [t.id for t in big.tasks[5 : 5 + MIN_WINDOW - 9]]
        # The urgent job's sent tasks wait again, and the room goes to the job now ahead of it (95 > 90).
        assert top_up(session, FARM) == [t.id for t in big.tasks[5 + MIN_WINDOW - 9 : 5 + MIN_WINDOW]]


def test_a_task_retried_or_handed_on_after_a_delay_waits_without_a_message_until_due(
    sessions: sessionmaker[Session], job: PreparedJob
) -> None:
    """No broker countdown: a delayed task is held in the database, and the first top-up after it falls due
    sends it; the sweeper never mistakes it for a lost message meanwhile."""
    first, second, third = (task.id for task in job.tasks)
    with sessions.begin() as session:
        register_worker(session, "w#1", "w", "cpu", 1, ["archfarm"])
        assert top_up(session, FARM) == [first, second, third]
        claim_task(session, first, "w#1")
        assert requeue_task(session, first, "w#1", delay_s=30)  # a transient error's backoff
        assert postpone_task(session, second, 30)  # handed on for another node
        assert top_up(session, FARM) == []  # not due yet
        later = prepared(URGENT_ID, seeds=2)
        persist(session, later)
        assert top_up(session, FARM) == [t.id for t in later.tasks]  # their places go to the next job
    backdate(sessions, 600, workers=True)
    with sessions.begin() as session:
        assert sweep(session, stranded_now(session, 60), 100) == []  # held by design, not lost
        session.execute(update(Task).where(Task.id.in_([first, second])).values(due_at=db_now(-1)))
        assert top_up(session, FARM) == [first, second]  # due: sent again, in expansion order
        assert sweep(session, stranded_now(session, 60), 100) == []


def test_heartbeats_and_reaping_use_the_databases_clock(
    sessions: sessionmaker[Session], job: PreparedJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock runs an hour behind must not get its live workers reaped."""
    import shared.db.models

    skewed = shared.db.models.utcnow() - timedelta(hours=1)
    monkeypatch.setattr(shared.db.models, "utcnow", lambda: skewed)
    with sessions.begin() as session:
        register_worker(session, "w#1", "w", "cpu", 1, ["archfarm"])
        claim_task(session, job.tasks[0].id, "w#1")
        assert heartbeat(session, "w#1")
    with sessions.begin() as session:
        assert reap(session, 60) == []
    backdate(sessions, 120, workers=True)
    with sessions.begin() as session:
        assert reap(session, 60) == [job.tasks[0].id]
        assert not heartbeat(session, "w#1")  # declared dead: it must stop


def test_resent_messages_go_to_the_queue_recorded_on_the_job(sessions: sessionmaker[Session]) -> None:
    """A reaper, sweeper or retry in a process configured for another queue still sends a job's tasks to
    the workers it was submitted for."""
    from shared.broker import messages_for
    from shared.config import Settings

    job = dataclasses.replace(prepared(), queue="pool-a")
    with sessions.begin() as session:
        persist(session, job)
    ids = [t.id for t in job.tasks]
    messages = messages_for(sessions, Settings(queue="somewhere-else"), list(reversed(ids)))
    assert [m.task_id for m in messages] == list(reversed(ids))
    assert {m.queue for m in messages} == {"pool-a"}
