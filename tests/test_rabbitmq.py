"""RabbitMQ as the broker: quorum queues with a delivery limit, read by /metrics. A farm of real workers on
RabbitMQ, its broker killed mid-job, is the chaos suite's (tests/chaos)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import kombu
import pytest
from amqp.exceptions import PreconditionFailed
from kombu.exceptions import OperationalError

from shared.broker import make_celery, queue_depths
from shared.config import Settings
from shared.rabbitmq import DELIVERY_LIMIT
from tests.conftest import service_missing

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
        assert queue_depths(rabbitmq_url, [pool.name, queue]) == {pool.name: 1, queue: 0}  # what /metrics reads
        deliveries = 0
        while (message := pool.get(no_ack=False)) is not None:  # each worker that takes it dies: it comes back
            deliveries += 1
            message.requeue()
            assert deliveries <= 2 * DELIVERY_LIMIT, "the broker never dropped it"
    assert deliveries == DELIVERY_LIMIT + 1  # the first delivery and DELIVERY_LIMIT returns
