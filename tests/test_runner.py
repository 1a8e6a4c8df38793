"""Failure policy of a worker's runner, on both databases with real files and storage.

A failing task is retried on other workers and fails for good after three; a worker that failed three
tasks of a job hands that job's tasks on; bad input fails at once; a storage outage hands the task back.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from producer.submit import persist, prepare
from shared.config import Settings
from shared.db.models import Task, TaskStatus
from shared.db.store import register_worker, stop_worker
from shared.spec import JobSpec
from shared.storage import LocalStorage
from workers.runner import BLOCKED_DELAY_S, TRANSIENT_ATTEMPTS_LIMIT, Runner

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


class Resent(list):
    """What a worker would have sent to the broker again."""

    def __call__(self, task_ids: list[str], delay: float) -> None:
        self.extend((task_id, delay) for task_id in task_ids)


def submit(sessions: sessionmaker[Session], settings: Settings, plan: Path, seeds: int, output: str) -> list[str]:
    spec = JobSpec.model_validate(
        {"plans": [str(plan)], "styles": ["modern"], "seeds": {"count": seeds}, "profile": PROFILE, "output": output}
    )
    job = prepare(spec, settings)
    with sessions.begin() as session:
        persist(session, job)
    return [t.id for t in job.tasks]


def task(sessions: sessionmaker[Session], task_id: str) -> Task:
    with sessions() as session:
        return session.get_one(Task, task_id)


@pytest.fixture
def settings(database_url: str, models_dir: Path) -> Settings:
    return Settings(database_url=database_url, models_dir=models_dir, device="cpu")


@pytest.fixture
def plan(tmp_path: Path, example_plan: Path) -> Path:
    path = tmp_path / "plan.png"
    path.write_bytes(example_plan.read_bytes())
    return path


def runner(settings: Settings, sessions: sessionmaker[Session], node: str, resend: Resent) -> Runner:
    return Runner(settings, sessions, f"{node}#1", node=node, resend=resend)


def test_a_failing_task_moves_on_and_fails_for_good_after_three_workers(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    plan.unlink()  # the plan vanished after submit: not the worker's fault, so another one tries
    resent = Resent()
    for attempt, node in enumerate(["gpu-a", "gpu-b", "gpu-c"], start=1):
        runner(settings, sessions, node, resent).run(task_id)
        row = task(sessions, task_id)
        if attempt < 3:
            assert row.status is TaskStatus.QUEUED and row.worker is None
            assert resent[-1] == (task_id, 0)
    assert row.status is TaskStatus.FAILED
    assert row.error.startswith("failed 3 times on 3 workers, last: FileNotFoundError")
    assert len(resent) == 2


def test_a_worker_that_failed_three_tasks_of_a_job_hands_the_rest_on(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    ids = submit(sessions, settings, plan, 4, str(tmp_path / "out"))
    plan.unlink()
    resent = Resent()
    bad = runner(settings, sessions, "gpu-bad", resent)
    with sessions.begin() as session:  # two live workers: the bad one and a healthy one
        register_worker(session, "gpu-bad#1", "gpu-bad", "cuda:0", 1)
        register_worker(session, "gpu-good#1", "gpu-good", "cuda:0", 2)
    for task_id in ids[:3]:
        bad.run(task_id)
    assert bad.run(ids[3]) is TaskStatus.QUEUED
    assert resent[-1] == (ids[3], BLOCKED_DELAY_S)
    fourth = task(sessions, ids[3])
    assert fourth.status is TaskStatus.QUEUED and fourth.attempts == 0  # never claimed by the blocklisted node
    with sessions.begin() as session:  # the healthy worker leaves: nobody may run the job any more
        stop_worker(session, "gpu-good#1")
    assert bad.run(ids[3]) is TaskStatus.FAILED
    assert task(sessions, ids[3]).error == "every live worker is blocklisted for this job"


def test_one_worker_alone_gives_up_after_five_attempts(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    plan.unlink()
    resent = Resent()
    alone = runner(settings, sessions, "gpu-a", resent)
    for _ in range(5):
        alone.run(task_id)
    row = task(sessions, task_id)
    assert row.status is TaskStatus.FAILED and row.error.startswith("failed 5 times on 1 workers")
    assert len(resent) == 4


def test_bad_input_fails_at_once(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    plan.write_bytes(b"edited")
    resent = Resent()
    assert runner(settings, sessions, "gpu-a", resent).run(task_id) is TaskStatus.FAILED
    assert "the plan changed after the job was submitted" in task(sessions, task_id).error
    assert resent == []


@pytest.mark.s3
def test_a_storage_outage_hands_the_task_back_until_storage_returns(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, s3_server
) -> None:
    settings = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint_url})
    bucket = f"late-{uuid.uuid4().hex[:12]}"
    (task_id,) = submit(sessions, settings, plan, 1, f"s3://{bucket}/out")
    resent = Resent()
    worker = runner(settings, sessions, "gpu-a", resent)
    worker.run(task_id)
    worker.flush()  # the upload runs behind the render
    assert task(sessions, task_id).status is TaskStatus.QUEUED
    assert resent == [(task_id, BLOCKED_DELAY_S)]
    s3_server.client().create_bucket(Bucket=bucket)
    worker.run(task_id)
    worker.close()
    assert task(sessions, task_id).status is TaskStatus.SUCCEEDED
    with sessions() as session:
        assert session.scalar(select(Task.attempts).where(Task.id == task_id)) == 2


def test_control_maps_are_computed_once_per_plan_and_preprocessor(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    spec = JobSpec.model_validate(
        {
            "plans": [str(plan)],
            "styles": ["modern", "japandi"],
            "seeds": {"count": 2},
            "output": str(tmp_path / "out"),
            "profile": {**PROFILE, "controls": [{"kind": "canny"}, {"kind": "plan-depth", "scale": 0.6}]},
        }
    )
    job = prepare(spec, settings)
    with sessions.begin() as session:
        persist(session, job)
    shared = LocalStorage(tmp_path / "shared")
    first = Runner(settings, sessions, "w1#1", map_storage=shared)
    for t in job.tasks[:2]:
        first.run(t.id)
    first.close()
    assert (first.maps.cache.computed, first.maps.cache.memory_hits) == (2, 2)  # 2 tasks × 2 units
    second = Runner(settings, sessions, "w2#1", map_storage=shared)  # another worker, same storage
    for t in job.tasks[2:]:
        second.run(t.id)
    second.close()
    assert second.maps.cache.computed == 0 and second.maps.cache.storage_hits == 2
    with sessions() as session:
        assert {s for (s,) in session.execute(select(Task.status))} == {TaskStatus.SUCCEEDED}


@pytest.mark.s3
def test_a_storage_that_never_returns_fails_the_task_after_ten_attempts(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, s3_server
) -> None:
    settings = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint_url})
    (task_id,) = submit(sessions, settings, plan, 1, f"s3://missing-{uuid.uuid4().hex[:12]}/out")
    resent = Resent()
    worker = runner(settings, sessions, "gpu-a", resent)
    for _ in range(TRANSIENT_ATTEMPTS_LIMIT):
        worker.run(task_id)
        worker.flush()
    worker.close()
    row = task(sessions, task_id)
    assert row.status is TaskStatus.FAILED and row.error.startswith("gave up after 10 attempts: StorageError")
    assert len(resent) == TRANSIENT_ATTEMPTS_LIMIT - 1
