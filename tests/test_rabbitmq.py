"""RabbitMQ as the broker: quorum queues with a delivery limit, and a farm of real workers on it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import kombu
import pytest
from amqp.exceptions import PreconditionFailed
from kombu.exceptions import OperationalError
from sqlalchemy import func, select

from producer.client import Farm
from shared.broker import make_celery, queue_depths
from shared.config import Settings
from shared.db.models import Artifact, Task
from shared.db.status import JobStatus
from shared.rabbitmq import DELIVERY_LIMIT
from tests.conftest import service_missing
from tests.processes import WorkerProcess, live_workers, wait_for
from tests.test_farm import FAST, job

pytestmark = [pytest.mark.rabbitmq]

RABBITMQ_URL = os.environ.get("ARCHFARM_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    try:
        with kombu.Connection(RABBITMQ_URL, connect_timeout=2) as connection:
            connection.connect()
    except (OSError, OperationalError) as error:
        service_missing(f"RabbitMQ not reachable at {RABBITMQ_URL.split('@')[-1]}: {error}")
    return RABBITMQ_URL


@pytest.fixture
def queue(rabbitmq_url: str) -> Iterator[str]:
    name = f"archfarm-test-{uuid.uuid4().hex[:8]}"
    yield name
    with kombu.Connection(rabbitmq_url) as connection:
        channel = connection.channel()
        for suffix in ("", ".sdxl"):
            channel.queue_delete(name + suffix)


def test_every_queue_is_a_quorum_queue_that_drops_a_poison_message_after_its_delivery_limit(
    rabbitmq_url: str, queue: str
) -> None:
    app = make_celery(Settings(broker_url=rabbitmq_url, queue=queue))
    with app.connection_for_write() as connection:
        channel = connection.channel()
        pool = app.amqp.queues[f"{queue}.sdxl"](channel)  # a pool's queue, met after the app was built
        pool.declare()
        with pytest.raises(PreconditionFailed, match="x-queue-type"):  # it is a quorum queue, not a classic one
            kombu.Queue(pool.name, pool.exchange, pool.routing_key)(connection.channel()).declare()
        producer = kombu.Producer(channel)
        producer.publish({"task": "poison"}, exchange=pool.exchange, routing_key=pool.routing_key)
        deliveries = 0
        while (message := pool.get(no_ack=False)) is not None:  # each worker that takes it dies: it comes back
            deliveries += 1
            message.requeue()
            assert deliveries <= 2 * DELIVERY_LIMIT, "the broker never dropped it"
    assert deliveries == DELIVERY_LIMIT + 1  # the first delivery and DELIVERY_LIMIT returns


@pytest.mark.postgres
@pytest.mark.s3
@pytest.mark.slow
def test_a_farm_on_rabbitmq_renders_a_job_and_reports_its_queue(
    farm_env: dict[str, str],
    rabbitmq_url: str,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
    example_plan: Path,
    tmp_path: Path,
) -> None:
    env = {**farm_env, "ARCHFARM_BROKER_URL": rabbitmq_url, "ARCHFARM_QUEUE": queue}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with Farm(Settings()) as farm:
        job_id = farm.submit(job(example_plan, FAST, seeds=3))
        assert queue_depths(rabbitmq_url, [queue]) == {queue: 6}  # stored, sent, waiting
        worker = WorkerProcess(env, "cpu:1", tmp_path / "worker.log")
        try:
            wait_for(lambda: live_workers(farm) == 1, 120, "the worker to start")
            view = farm.wait(job_id, timeout=180)
        finally:
            worker.stop()
        assert view.status is JobStatus.SUCCEEDED, worker.log.read_text()[-3000:]
        with farm.sessions() as session:
            images = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
            attempts = session.scalars(select(Task.attempts).where(Task.job_id == job_id)).all()
    assert images == 6 and attempts == [1] * 6 and queue_depths(rabbitmq_url, [queue]) == {queue: 0}
    assert worker.proc.returncode == 0
