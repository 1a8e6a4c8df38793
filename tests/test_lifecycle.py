"""A task's lifecycle in a worker process, on both databases with real files and storage.

Every error a task can raise ends with a reason on its row or back on the queue, decided by the one policy:
errors move a task to other workers and fail it after three; only errors on plans other nodes render count
towards a node's blocklist; a process that died is a crash, held against the task, never the node; bad input
fails at once, with every queued task sharing it; transient errors back off for as long as the time budget
lasts; an outcome is kept through a database outage.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from producer.submit import persist, prepare
from shared.config import Settings
from shared.db.models import Artifact, Job, Task, TaskFailure, TaskStatus
from shared.db.session import make_engine, session_factory
from shared.db.store import blocklisted_nodes, claim_task, register_worker, stop_worker
from shared.spec import JobSpec
from shared.storage import LocalStorage
from tests.faults import TcpProxy
from workers.lifecycle import Lifecycle
from workers.policy import Limits

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


class Sent(list):
    """What a worker would have sent to the broker again: (task id, delay)."""

    def __call__(self, task_ids: list[str], delay: float) -> None:
        self.extend((task_id, delay) for task_id in task_ids)


def submit(
    sessions: sessionmaker[Session],
    settings: Settings,
    plan: Path,
    seeds: int,
    output: str,
    styles: tuple[object, ...] = ("modern",),
    **profile,
) -> list[str]:  # type: ignore[no-untyped-def]
    spec = JobSpec.model_validate(
        {
            "plans": [str(plan)],
            "styles": list(styles),
            "seeds": {"count": seeds},
            "profile": {**PROFILE, **profile},
            "output": output,
        }
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
    return Settings(database_url=database_url, models_dir=models_dir, device="cpu", transient_budget=900)


@pytest.fixture
def plan(tmp_path: Path, example_plan: Path) -> Path:
    path = tmp_path / "plan.png"
    path.write_bytes(example_plan.read_bytes())
    return path


IMPATIENT = Limits(upload_patience_s=0)
"""The farm's limits, but a failed upload goes straight back to the queue, so each attempt is one call."""


def worker(
    settings: Settings, sessions: sessionmaker[Session], node: str, sent: Sent, limits: Limits = IMPATIENT
) -> Lifecycle:
    return Lifecycle(settings, sessions, worker=f"{node}#1", node=node, send=sent, limits=limits)


def broken(settings: Settings) -> Settings:
    """A node whose device will not start (this machine has no CUDA): every task fails there with an error
    another node may not have."""
    return settings.model_copy(update={"device": "cuda:0"})


NO_CUDA = "device 'cuda:0' asked for, but CUDA is not available here"


def test_a_failing_task_moves_on_and_fails_for_good_after_three_workers(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    sent = Sent()
    for attempt, node in enumerate(["gpu-a", "gpu-b", "gpu-c"], start=1):
        worker(broken(settings), sessions, node, sent).run(task_id)
        row = task(sessions, task_id)
        if attempt < 3:
            assert row.status is TaskStatus.QUEUED and row.worker is None
            assert sent[-1] == (task_id, 0)
    assert row.status is TaskStatus.FAILED
    assert row.error == f"failed 3 times on 3 workers, last: {NO_CUDA}"
    assert len(sent) == 2


def register(sessions: sessionmaker[Session], *nodes: str) -> None:
    """Live workers on the default queue, as farm workers register themselves."""
    with sessions.begin() as session:
        for pid, node in enumerate(nodes, start=1):
            register_worker(session, f"{node}#1", node, "cuda:0", pid, [Settings().queue])


@pytest.mark.slow
def test_a_worker_that_fails_tasks_others_render_is_blocklisted_and_hands_the_rest_on(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    ids = submit(sessions, settings, plan, 6, str(tmp_path / "out"))
    register(sessions, "gpu-bad", "gpu-good")
    sent = Sent()
    bad = worker(broken(settings), sessions, "gpu-bad", sent)
    good = worker(settings, sessions, "gpu-good", sent)
    for task_id in ids[:3]:
        assert bad.run(task_id) is TaskStatus.QUEUED
    job_id = task(sessions, ids[0]).job_id
    with sessions() as session:
        assert blocklisted_nodes(session, job_id, 3) == set()  # no evidence yet: nobody has rendered the plan
    good.run(ids[3])  # the healthy node renders a task of the same plan: the failures were the node's
    good.flush()
    with sessions() as session:
        assert blocklisted_nodes(session, job_id, 3) == {"gpu-bad"}
    assert bad.run(ids[4]) is TaskStatus.QUEUED
    assert sent[-1] == (ids[4], Limits().hand_on_delay_s)
    fifth = task(sessions, ids[4])
    assert fifth.status is TaskStatus.QUEUED and fifth.attempts == 0  # never claimed by the blocklisted node
    with sessions.begin() as session:  # the healthy worker leaves: nobody may run the job any more
        stop_worker(session, "gpu-good#1")
    assert bad.run(ids[4]) is TaskStatus.FAILED
    assert task(sessions, ids[4]).error == (
        f"every live worker is blocklisted for this job; the error that blocklisted this one: {NO_CUDA}"
    )


def test_failures_every_node_shares_blocklist_no_node(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    """Two nodes fail every task with the same error and render nothing: the tasks are at fault (or the job),
    not the nodes, so both keep taking the job's tasks and each task fails with its own error."""
    ids = submit(sessions, settings, plan, 4, str(tmp_path / "out"))
    register(sessions, "gpu-a", "gpu-b")
    sent = Sent()
    nodes = [worker(broken(settings), sessions, node, sent) for node in ("gpu-a", "gpu-b")]
    for _ in range(3):
        for task_id in ids:
            for lifecycle in nodes:
                lifecycle.run(task_id)
    with sessions() as session:
        assert blocklisted_nodes(session, task(sessions, ids[0]).job_id, 1) == set()
    rows = [task(sessions, t) for t in ids]
    assert {row.status for row in rows} == {TaskStatus.FAILED}
    assert {row.error for row in rows} == {f"failed 5 times on 2 workers, last: {NO_CUDA}"}


@pytest.mark.slow
def test_a_task_that_failed_on_a_node_goes_to_another_while_one_is_live(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    register(sessions, "gpu-a", "gpu-b")
    sent = Sent()
    first = worker(broken(settings), sessions, "gpu-a", sent)
    assert first.run(task_id) is TaskStatus.QUEUED
    assert first.run(task_id) is TaskStatus.QUEUED  # handed on, not claimed: gpu-b has not tried it
    assert sent[-1] == (task_id, Limits().hand_on_delay_s) and task(sessions, task_id).attempts == 1
    second = worker(settings, sessions, "gpu-b", sent)
    second.run(task_id)
    second.close()
    assert task(sessions, task_id).status is TaskStatus.SUCCEEDED


def test_one_worker_alone_gives_up_after_five_attempts(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    sent = Sent()
    alone = worker(broken(settings), sessions, "gpu-a", sent)
    for _ in range(5):
        alone.run(task_id)
    row = task(sessions, task_id)
    assert row.status is TaskStatus.FAILED and row.error.startswith("failed 5 times on 1 workers")
    assert len(sent) == 4


def test_bad_input_fails_at_once(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    plan.write_bytes(b"edited")
    sent = Sent()
    assert worker(settings, sessions, "gpu-a", sent).run(task_id) is TaskStatus.FAILED
    assert task(sessions, task_id).error == f"plan 'plan' ({plan.as_uri()}): changed after the job was submitted"
    assert sent == []


def two_plans(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, example_plan: Path, tmp_path: Path, **profile
) -> tuple[Path, list[Task]]:  # type: ignore[no-untyped-def]
    """A job of `plan` and another plan, two styles and two seeds each; returns the other plan's file and the
    job's tasks."""
    other = tmp_path / "other.png"
    drawn = Image.open(example_plan).convert("RGB")
    drawn.paste((0, 0, 0), (10, 10, 60, 60))
    drawn.save(other)
    spec = JobSpec.model_validate(
        {
            "plans": [str(plan), str(other)],
            "styles": ["modern", "japandi"],
            "seeds": {"count": 2},
            "profile": {**PROFILE, **profile},
            "output": str(tmp_path / "out"),
        }
    )
    job = prepare(spec, settings)
    with sessions.begin() as session:
        persist(session, job)
    with sessions() as session:
        return other, list(session.scalars(select(Task).order_by(Task.ordinal)))


@pytest.mark.parametrize("damage", ["deleted", "not an image"])
@pytest.mark.slow
def test_a_plan_that_cannot_be_read_fails_its_own_tasks_together_and_blames_no_node(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, example_plan: Path, tmp_path: Path, damage: str
) -> None:
    """Every task of the unreadable plan fails once, with one reason that names the plan; the other plan's
    tasks render; no node is held responsible; a retry once the plan is back renders the rest."""
    other, tasks = two_plans(sessions, settings, plan, example_plan, tmp_path)
    original = other.read_bytes()
    if damage == "deleted":
        other.unlink()
    else:
        other.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    register(sessions, "gpu-a", "gpu-b")
    sent = Sent()
    nodes = [worker(settings, sessions, node, sent) for node in ("gpu-a", "gpu-b")]
    for i, row in enumerate(tasks):
        nodes[i % 2].run(row.id)
    for lifecycle in nodes:
        lifecycle.flush()
    after = {row.id: task(sessions, row.id) for row in tasks}
    ok = [after[row.id] for row in tasks if row.plan_name == "plan"]
    bad = [after[row.id] for row in tasks if row.plan_name == "other"]
    assert {row.status for row in ok} == {TaskStatus.SUCCEEDED}
    assert {row.status for row in bad} == {TaskStatus.FAILED}
    (reason,) = {row.error for row in bad}
    assert reason.startswith(f"plan 'other' ({other.as_uri()}): ")
    assert ("missing from storage" in reason) == (damage == "deleted")
    assert sent == []  # nothing was retried
    with sessions() as session:
        assert session.scalars(select(TaskFailure)).all() == []  # no attempt counted against any node
    other.write_bytes(original)
    with sessions.begin() as session:
        from shared.db.store import retry_job

        retried = retry_job(session, tasks[0].job_id)
    assert sorted(retried) == sorted(row.id for row in bad)
    for task_id in retried:
        nodes[0].run(task_id)
    for lifecycle in nodes:
        lifecycle.close()
    assert {task(sessions, row.id).status for row in tasks} == {TaskStatus.SUCCEEDED}


def test_a_model_that_cannot_load_fails_the_whole_job_at_once(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, example_plan: Path, tmp_path: Path
) -> None:
    """Every task of the job needs the model: they fail together with its reason instead of one by one."""
    folder = tmp_path / "broken-controlnet"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    _, tasks = two_plans(sessions, settings, plan, example_plan, tmp_path, controls=[{"kind": "canny"}])
    with sessions.begin() as session:  # the job as a worker reads it: its ControlNet is the broken folder
        job = session.scalars(select(Job)).one()
        units = [{**job.spec["profile"]["controls"][0], "model": str(folder)}]
        job.spec = {**job.spec, "profile": {**job.spec["profile"], "controls": units}}
    sent = Sent()
    assert worker(settings, sessions, "gpu-a", sent).run(tasks[0].id) is TaskStatus.FAILED
    rows = [task(sessions, row.id) for row in tasks]
    assert {row.status for row in rows} == {TaskStatus.FAILED}
    (reason,) = {row.error for row in rows}
    assert reason.startswith(f"cannot load model '{folder}'")
    assert sent == []


def test_a_model_folder_missing_on_the_worker_fails_the_task_with_that_reason(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path, models_dir: Path
) -> None:
    """The job was valid where it was submitted; the worker trusts it and says what it could not load."""
    folder = tmp_path / "my-controlnet"
    folder.symlink_to(next(models_dir.glob("tiny-canny-v*")), target_is_directory=True)
    (task_id,) = submit(
        sessions, settings, plan, 1, str(tmp_path / "out"), controls=[{"kind": "canny", "model": str(folder)}]
    )
    folder.unlink()  # this worker has no such folder
    sent = Sent()
    assert worker(settings, sessions, "gpu-a", sent).run(task_id) is TaskStatus.FAILED
    row = task(sessions, task_id)
    assert row.error.startswith(f"cannot load model '{folder}'") and row.worker == "gpu-a#1"
    assert sent == []


def test_a_stored_spec_that_no_longer_validates_fails_its_task_with_a_reason(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    with sessions.begin() as session:
        job = session.scalars(select(Job)).one()
        job.spec = {**job.spec, "profile": {**job.spec["profile"], "steps": 0}}
    assert worker(settings, sessions, "gpu-a", Sent()).run(task_id) is TaskStatus.FAILED
    assert task(sessions, task_id).error == "its stored job spec no longer validates (1 errors)"


def test_a_device_the_worker_cannot_use_fails_tasks_with_the_reason(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"))
    sent = Sent()
    assert (
        worker(broken(settings), sessions, "gpu-a", sent).run(task_id) is TaskStatus.QUEUED
    )  # another node may have it
    assert sent == [(task_id, 0)]
    with sessions() as session:
        (error,) = session.scalars(select(TaskFailure.error))
    assert error == NO_CUDA


def late_bucket(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, s3_server
) -> tuple[Settings, str, str]:  # type: ignore[no-untyped-def]
    """A task whose output bucket does not exist yet: its uploads fail, as in an outage, until it is made."""
    settings = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint_url})
    bucket = f"late-{uuid.uuid4().hex[:12]}"
    (task_id,) = submit(sessions, settings, plan, 1, f"s3://{bucket}/out")
    return settings, bucket, task_id


@pytest.mark.s3
@pytest.mark.slow
def test_a_storage_outage_backs_off_until_storage_returns(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, s3_server
) -> None:
    settings, bucket, task_id = late_bucket(sessions, settings, plan, s3_server)
    sent = Sent()
    lifecycle = worker(settings, sessions, "gpu-a", sent)
    for attempt in range(1, 13):  # more attempts than any count limit: the budget is a time
        lifecycle.run(task_id)
        lifecycle.flush()  # the upload runs behind the render
        assert task(sessions, task_id).status is TaskStatus.QUEUED
        assert sent[-1] == (task_id, min(2.0 * 2 ** (attempt - 1), 60.0))
    with sessions() as session:
        assert blocklisted_nodes(session, task(sessions, task_id).job_id, 1) == set()  # not the node's fault
    s3_server.client().create_bucket(Bucket=bucket)
    lifecycle.run(task_id)
    lifecycle.close()
    row = task(sessions, task_id)
    assert row.status is TaskStatus.SUCCEEDED and row.attempts == 13


@pytest.mark.s3
@pytest.mark.slow
def test_a_short_storage_outage_is_ridden_out_in_place(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, s3_server
) -> None:
    """The upload waits for storage instead of sending the task round the queue again: one attempt."""
    settings, bucket, task_id = late_bucket(sessions, settings, plan, s3_server)
    sent = Sent()
    lifecycle = worker(settings, sessions, "gpu-a", sent, Limits(upload_patience_s=60))
    threading.Timer(1.5, lambda: s3_server.client().create_bucket(Bucket=bucket)).start()
    lifecycle.run(task_id)
    lifecycle.close()
    row = task(sessions, task_id)
    assert row.status is TaskStatus.SUCCEEDED and row.attempts == 1 and sent == []


@pytest.mark.s3
@pytest.mark.slow
def test_transient_errors_fail_the_task_once_the_time_budget_is_spent(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, s3_server
) -> None:
    settings = settings.model_copy(update={"s3_endpoint_url": s3_server.endpoint_url, "transient_budget": 1.5})
    (task_id,) = submit(sessions, settings, plan, 1, f"s3://missing-{uuid.uuid4().hex[:12]}/out")
    lifecycle = worker(settings, sessions, "gpu-a", Sent(), Limits(transient_budget_s=1.5, upload_patience_s=0))
    started = time.monotonic()
    while task(sessions, task_id).status is TaskStatus.QUEUED:
        lifecycle.run(task_id)
        lifecycle.flush()
        assert time.monotonic() - started < 60
    lifecycle.close()
    row = task(sessions, task_id)
    assert row.status is TaskStatus.FAILED
    # The budget is 1.5 s; how far past it the last attempt ends depends on the machine's load.
    assert re.match(r"gave up after \d+ s of transient errors", row.error) and "StorageError" not in row.error
    assert "NoSuchBucket" in row.error


def test_a_crashed_process_is_held_against_the_task_not_the_node(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    ids = submit(sessions, settings, plan, 3, str(tmp_path / "out"))
    sent = Sent()
    for task_id in ids:  # a pool process on node gpu-a died holding each of them
        with sessions.begin() as session:
            claim_task(session, task_id, "gpu-a#1")
    worker(settings, sessions, "gpu-a", sent).recover_crashed("the worker process running it died")
    assert {task(sessions, t).status for t in ids} == {TaskStatus.QUEUED} and sorted(sent) == sorted(
        (t, 0) for t in ids
    )
    with sessions() as session:
        assert blocklisted_nodes(session, task(sessions, ids[0]).job_id, 1) == set()
    # The same task dying on two more nodes: it kills every process it runs in, so it fails.
    for node in ("gpu-b", "gpu-c"):
        with sessions.begin() as session:
            claim_task(session, ids[0], f"{node}#1")
        worker(settings, sessions, node, sent).recover_crashed("the worker process running it died")
    assert task(sessions, ids[0]).status is TaskStatus.FAILED
    assert task(sessions, ids[0]).error == "its worker process died 3 times on 3 workers"


@pytest.mark.slow
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
    first = Lifecycle(settings, sessions, worker="w1#1", node="w1", send=Sent(), limits=Limits(), farm_storage=shared)
    for t in job.tasks[:2]:
        first.run(t.id)
    first.close()
    assert first.renderer is not None
    assert (first.renderer.maps.cache.computed, first.renderer.maps.cache.memory_hits) == (2, 2)  # 2 tasks × 2 units
    second = Lifecycle(settings, sessions, worker="w2#1", node="w2", send=Sent(), limits=Limits(), farm_storage=shared)
    for t in job.tasks[2:]:
        second.run(t.id)
    second.close()
    assert second.renderer is not None
    assert second.renderer.maps.cache.computed == 0 and second.renderer.maps.cache.storage_hits == 2
    with sessions() as session:
        assert {s for (s,) in session.execute(select(Task.status))} == {TaskStatus.SUCCEEDED}


@pytest.mark.postgres
@pytest.mark.slow
def test_an_outcome_is_kept_through_a_database_outage_and_recorded_after(
    postgres_url: str, models_dir: Path, plan: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The render finishes while PostgreSQL is unreachable: the worker holds the result, never leaves the task
    running for good, and records it once the database answers again."""
    from sqlalchemy.engine import make_url

    from tests.conftest import empty_postgres

    settings = Settings(database_url=postgres_url, models_dir=models_dir, device="cpu")
    direct = session_factory(make_engine(postgres_url))
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    through = session_factory(make_engine(url.set(port=proxy.port).render_as_string(hide_password=False)))
    try:
        (task_id,) = submit(direct, settings, plan, 2, str(tmp_path / "out"), seeds_per_task=2)
        lifecycle = worker(settings, through, "gpu-a", Sent())
        outage = threading.Event()

        def cut_at_first_step(task: str, step: int, total: int) -> None:
            if not outage.is_set():
                outage.set()
                proxy.down()
                threading.Timer(3.0, proxy.up).start()

        assert lifecycle.run(task_id, progress=cut_at_first_step) is TaskStatus.RUNNING
        assert outage.is_set()
        lifecycle.close()  # returns once the outcome is recorded
        # It was held, not dropped, and the outage is one line when it starts and one when it ends, however
        # many attempts met it.
        assert caplog.text.count("database unreachable, retrying until it answers") == 1
        assert caplog.text.count("database answers again") == 1
        row = task(direct, task_id)
        assert row.status is TaskStatus.SUCCEEDED
        with direct() as session:
            assert len(session.scalars(select(Artifact).where(Artifact.task_id == task_id)).all()) == 2
    finally:
        proxy.close()
        empty_postgres(postgres_url)


def test_a_cancel_stops_the_task_and_leaves_it_cancelled(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    (task_id,) = submit(sessions, settings, plan, 1, str(tmp_path / "out"), steps=40)
    lifecycle = worker(settings, sessions, "gpu-a", Sent())

    def cancel_on_first_step(task: str, step: int, total: int) -> None:
        if step == 1:
            with sessions.begin() as session:
                session.execute(update(Job).values(cancelled_at=Job.created_at))

    assert lifecycle.run(task_id, progress=cancel_on_first_step) is TaskStatus.CANCELLED
    assert task(sessions, task_id).status is TaskStatus.CANCELLED


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.slow
def test_a_worker_renders_several_tasks_of_a_job_in_one_call(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    """`batch: 4`: the delivered task and three more of its job in one call; each image within 1/255 of its
    render alone, under the same key; the tasks not taken stay queued for their own messages."""
    ids = submit(sessions, settings, plan, 6, str(tmp_path / "batched"), batch=4)
    lifecycle = worker(settings, sessions, "gpu-a", Sent())
    assert lifecycle.run(ids[0]) is TaskStatus.RUNNING
    lifecycle.flush()
    statuses = [task(sessions, t).status for t in ids]
    assert statuses == [TaskStatus.SUCCEEDED] * 4 + [TaskStatus.QUEUED] * 2
    assert lifecycle.run(ids[2]) is TaskStatus.SUCCEEDED  # its own message finds it done
    lifecycle.run(ids[4])
    lifecycle.close()
    assert {task(sessions, t).status for t in ids} == {TaskStatus.SUCCEEDED}
    sidecar = json.loads(next((tmp_path / "batched").rglob("seed-0_*.json")).read_text())
    assert sidecar["call"] == {"images": 4, "tasks": 4}

    alone_ids = submit(sessions, settings, plan, 6, str(tmp_path / "alone"), batch=1)
    solo = worker(settings, sessions, "gpu-b", Sent())
    for task_id in alone_ids:
        solo.run(task_id)
    solo.close()
    batched = sorted((tmp_path / "batched").rglob("*.png"))
    alone = sorted((tmp_path / "alone").rglob("*.png"))
    assert [p.name for p in batched] == [p.name for p in alone]  # the same keys: batch is not in the digest
    for together, single in zip(batched, alone, strict=True):
        assert np.abs(pixels(together) - pixels(single)).max() <= 1


@pytest.mark.slow
def test_a_task_that_cannot_be_prepared_fails_alone_and_its_batch_renders(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path, example_plan: Path
) -> None:
    other, tasks = two_plans(sessions, settings, plan, example_plan, tmp_path, batch=8)
    other.unlink()  # its tasks cannot be read any more
    sent = Sent()
    lifecycle = worker(settings, sessions, "gpu-a", sent)
    lifecycle.run(tasks[0].id)
    lifecycle.close()
    after = [task(sessions, row.id) for row in tasks]
    assert {row.status for row in after if row.plan_name == "plan"} == {TaskStatus.SUCCEEDED}
    assert {row.status for row in after if row.plan_name == "other"} == {TaskStatus.FAILED}
    assert sent == []


@pytest.mark.slow
def test_a_cancel_stops_every_task_of_the_call(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    ids = submit(sessions, settings, plan, 3, str(tmp_path / "out"), steps=40, batch=3)
    lifecycle = worker(settings, sessions, "gpu-a", Sent())

    def cancel_on_first_step(task: str, step: int, total: int) -> None:
        if step == 1:
            with sessions.begin() as session:
                session.execute(update(Job).values(cancelled_at=Job.created_at))

    assert lifecycle.run(ids[0], progress=cancel_on_first_step) is TaskStatus.CANCELLED
    assert [task(sessions, t).status for t in ids] == [TaskStatus.CANCELLED] * 3


def test_a_call_gathers_only_tasks_of_its_style_when_the_style_carries_a_lora(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path, models_dir: Path
) -> None:
    """A style pack's LoRA is one per call: the tasks gathered beside a LoRA style's task are of that style;
    without a LoRA, any style of the job shares the call."""
    from shared.db.store import claim_more
    from workers.engine.presets import resolve
    from workers.engine.tiny import style_lora

    lora = style_lora(Path(resolve("tiny-sd15", models_dir)), tmp_path / "lora", 1)
    villa = {"name": "villa", "prompt": "warm oak villa", "loras": [{"file": str(lora)}]}
    ids = submit(sessions, settings, plan, 3, str(tmp_path / "out"), styles=(villa, "modern"), batch=8)
    styles = {t: task(sessions, t).style for t in ids}
    first = next(t for t in ids if styles[t] == "villa")
    with sessions.begin() as session:
        claim_task(session, first, "gpu-a#1")
        job_id = task(sessions, first).job_id
        gathered = claim_more(session, job_id, "gpu-a#1", 8, style="villa")
        assert {styles[t] for t in gathered} == {"villa"} and len(gathered) == 2
        assert {styles[t] for t in claim_more(session, job_id, "gpu-a#1", 8)} == {"modern"}


def test_a_crash_mid_call_sends_every_task_of_it_again(
    sessions: sessionmaker[Session], settings: Settings, plan: Path, tmp_path: Path
) -> None:
    from shared.db.store import claim_more

    ids = submit(sessions, settings, plan, 4, str(tmp_path / "out"), batch=4)
    with sessions.begin() as session:  # what a process rendering a batch of four holds when it is killed
        claim_task(session, ids[0], "gpu-a#1")
        assert claim_more(session, task(sessions, ids[0]).job_id, "gpu-a#1", 3) == ids[1:]
    sent = Sent()
    worker(settings, sessions, "gpu-a", sent).recover_crashed("the worker process running it died")
    assert sorted(sent) == sorted((t, 0) for t in ids)
    assert {task(sessions, t).status for t in ids} == {TaskStatus.QUEUED}
