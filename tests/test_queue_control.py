"""Queue control with real `archfarm worker` processes on Redis, PostgreSQL and S3: pause and resume, priority,
and pools, also when a pool's worker dies and the reaper of a worker outside the pool re-sends its tasks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from producer.client import Farm
from shared.broker import broker_priority
from shared.db.models import Artifact, Job, Task, TaskStatus, Worker
from shared.db.status import JobStatus
from shared.dispatch import MIN_WINDOW
from tests.conftest import queued_messages
from tests.processes import alive, children_of, live_workers, wait_for, wait_for_value
from tests.test_farm import FAST, SLOW, assert_exactly_one_artifact_per_image, job, pid_of, running_task

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.s3, pytest.mark.slow]


def counts(farm: Farm, job_id: str) -> dict[TaskStatus, int]:
    with farm.sessions() as session:
        rows = session.execute(
            select(Task.status, func.count()).where(Task.job_id == job_id).group_by(Task.status)
        ).all()
    return {TaskStatus(status): int(n) for status, n in rows}


def idle(farm: Farm) -> bool:
    with farm.sessions() as session:
        busy = session.scalar(
            select(func.count()).where(Worker.stopped_at.is_(None), Worker.idle_since.is_(None)).select_from(Worker)
        )
    return not busy


def test_a_paused_job_starts_nothing_until_resumed(
    farm: Farm, start_workers, farm_env: dict[str, str], example_plan: Path, s3_server, s3_bucket: str
) -> None:
    job_id = farm.submit(job(example_plan, FAST, seeds=2))
    assert farm.pause(job_id) and not farm.pause(job_id)
    assert farm.status(job_id).status is JobStatus.PAUSED
    start_workers("cpu:1")
    queue = farm_env["ARCHFARM_QUEUE"]
    # The worker takes each message and drops it: the queue empties and nothing is rendered.
    wait_for(lambda: queued_messages(farm_env["ARCHFARM_BROKER_URL"], queue) == 0, 60, "the messages to be taken")
    wait_for(lambda: idle(farm), 30, "the worker to be idle")
    assert counts(farm, job_id) == {TaskStatus.QUEUED: 4}
    assert farm.resume(job_id) == 4
    view = farm.wait(job_id, timeout=120)
    assert view.status is JobStatus.SUCCEEDED and not view.paused
    assert_exactly_one_artifact_per_image(farm, job_id, 4, s3_server, s3_bucket)


def test_a_raised_priority_goes_first_and_stale_messages_do_nothing(
    farm: Farm, start_workers, example_plan: Path, s3_server, s3_bucket: str
) -> None:
    first = farm.submit({**job(example_plan, FAST, seeds=2), "priority": 10})
    second = farm.submit({**job(example_plan, FAST, seeds=2), "name": "urgent", "priority": 10})
    assert farm.set_priority(second, 90) == 4  # its queued tasks, sent again at the new priority
    assert farm.status(second).priority == 90
    start_workers("cpu:1")
    for job_id in (first, second):
        assert farm.wait(job_id, timeout=120).status is JobStatus.SUCCEEDED
        assert_exactly_one_artifact_per_image(farm, job_id, 4, s3_server, s3_bucket)
    with farm.sessions() as session:
        started = {
            job_id: session.execute(
                select(func.min(Task.started_at), func.max(Task.started_at)).where(Task.job_id == job_id)
            ).one()
            for job_id in (first, second)
        }
    assert started[second][1] < started[first][0]  # every urgent task started before any of the other job


def test_a_pool_job_stays_in_its_pool_also_after_a_reaper_resend(
    farm: Farm, start_workers, example_plan: Path, s3_server, s3_bucket: str
) -> None:
    start_workers("cpu:1")  # the default pool's worker: alive throughout, so its reaper finds the dead one
    start_workers("cpu:1", 1, "--pool", "big")
    medium = {**SLOW, "width": 128, "height": 128, "steps": 15}  # a task long enough to be caught running
    job_id = farm.submit({**job(example_plan, medium, seeds=1), "pool": "big"})
    assert farm.status(job_id).pool == "big"
    _, holder = wait_for_value(lambda: running_task(farm, job_id), 60, "a task to start")
    main_pid = pid_of(farm, holder)
    pool_children = children_of(main_pid)
    os.kill(main_pid, signal.SIGKILL)  # the pool's only worker dies mid-task, with its pool process
    wait_for(lambda: not any(alive(pid) for pid in pool_children), 10, "its pool process to die")
    wait_for(lambda: live_workers(farm) == 1, 60, "the reaper to declare the pool worker dead")
    start_workers("cpu:1", 1, "--pool", "big")  # the reaper of the worker outside the pool re-sends the task
    view = farm.wait(job_id, timeout=180)
    assert view.status is JobStatus.SUCCEEDED
    assert_exactly_one_artifact_per_image(farm, job_id, 2, s3_server, s3_bucket)
    with farm.sessions() as session:
        rendered_by = session.scalars(
            select(Worker.queues).join(Task, Task.worker == Worker.id).where(Task.job_id == job_id)
        ).all()
    assert len(rendered_by) == 2 and all(queues == [f"{farm.settings.queue}.big"] for queues in rendered_by)


def test_an_urgent_jobs_lost_messages_are_sent_again_while_the_workers_stay_busy(
    farm: Farm, start_workers, farm_env: dict[str, str], example_plan: Path
) -> None:
    """The urgent job's messages vanish from the broker (as with Redis restarted without persistence) while a
    long, less urgent job keeps the only worker busy: the worker takes a message that sorts after them, which
    proves theirs gone, and they are sent again and rendered before the long job ends, not after it."""
    farm_env["ARCHFARM_STRANDED_AFTER"] = "2"
    medium = {**FAST, "width": 128, "height": 128, "steps": 8}
    background = farm.submit({**job(example_plan, medium, seeds=20), "priority": 10})
    start_workers("cpu:1")
    wait_for(lambda: counts(farm, background).get(TaskStatus.SUCCEEDED, 0) >= 2, 120, "the long job to get going")
    urgent = farm.submit({**job(example_plan, FAST, seeds=2), "name": "urgent", "priority": 90})
    broker = redis.Redis.from_url(farm_env["ARCHFARM_BROKER_URL"])
    lost = f"{farm_env['ARCHFARM_QUEUE']}:{broker_priority(90)}"  # kombu's list for that priority
    assert broker.llen(lost) >= 3 and broker.delete(lost) == 1
    assert farm.wait(urgent, timeout=120).status is JobStatus.SUCCEEDED
    assert counts(farm, background).get(TaskStatus.QUEUED, 0) > 0  # the long job was still going
    farm.cancel(background)


def test_a_small_job_of_another_owner_finishes_long_before_a_big_one_submitted_first(
    farm: Farm, start_workers, example_plan: Path, s3_server, s3_bucket: str
) -> None:
    """Fair share with a real worker: alice's 400-task job runs, bob submits 40 tasks; the worker's next free
    places go to bob until he has caught up, so his job ends long before alice's, and nothing is lost."""
    quick = {**FAST, "steps": 2}
    alice = farm.submit(job(example_plan, quick, seeds=200), owner="alice")
    start_workers("cpu:1")
    wait_for(lambda: counts(farm, alice).get(TaskStatus.SUCCEEDED, 0) >= 20, 180, "alice's first renders")
    bob = farm.submit(job(example_plan, quick, seeds=20), owner="bob")
    for job_id, tasks in ((bob, 40), (alice, 400)):
        view = farm.wait(job_id, timeout=600)
        assert view.status is JobStatus.SUCCEEDED and view.counts["succeeded"] == tasks
    with farm.sessions() as session:
        submitted = session.scalar(select(Job.created_at).where(Job.id == bob))
        ends = {
            job_id: session.scalar(select(func.max(Task.finished_at)).where(Task.job_id == job_id))
            for job_id in (alice, bob)
        }
        alice_by_then = session.scalar(
            select(func.count()).where(Task.job_id == alice, Task.finished_at <= ends[bob]).select_from(Task)
        )
        before = session.scalar(
            select(func.count()).where(Task.job_id == alice, Task.finished_at <= submitted).select_from(Task)
        )
        images = {
            job_id: session.scalars(select(Artifact.id).where(Artifact.job_id == job_id)).all() for job_id in ends
        }
    took = {job_id: (end - submitted).total_seconds() for job_id, end in ends.items()}
    print(
        f"\nfair share: bob's 40 tasks done {took[bob]:.1f} s after his submit, alice's 400 {took[alice]:.1f} s after "
        f"it; alice had {before} done at bob's submit and {alice_by_then} when bob's last ended"
    )
    # Bob waited at most for alice's messages already in the window, not for her job: in submission order he
    # would have waited for all 400.
    assert alice_by_then - (before or 0) <= MIN_WINDOW + 40
    assert took[bob] < took[alice] / 2
    assert {job_id: len(ids) for job_id, ids in images.items()} == {alice: 400, bob: 40}
