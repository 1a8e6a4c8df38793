"""RabbitMQ as the broker (`ARCHFARM_BROKER_URL=amqp://...`): every queue a quorum queue.

Quorum queues are replicated (Raft) and keep their messages through a node's restart; classic queues are
deprecated for this. What they change, and how the farm meets it:
- Poison messages: a quorum queue counts deliveries, and one delivered `DELIVERY_LIMIT` times without an ack
  is dropped. The farm's own policy fails a task whose deliveries killed their process `crash_attempts`
  times (5 by default) first; the limit is the backstop for a message that kills its worker before the task
  is claimed. Its task is still queued in the database, and the sweeper sends it again once overdue.
- Long tasks: RabbitMQ closes a channel whose consumer holds a delivery past its consumer timeout (30 min by
  default) and redelivers the message. Each queue asks for the farm's visibility timeout, which bounds every
  task (submit refuses longer ones), as `x-consumer-timeout` (honoured from RabbitMQ 3.12; on older servers
  set `consumer_timeout` in rabbitmq.conf at least as high).
- Priorities: quorum queues deliver in order (RabbitMQ 4 adds two levels). The farm does not need more: the
  broker holds only a window of messages (`shared.dispatch`), and each top-up takes the waiting tasks by
  fair share, priority and deadline, so a raised priority goes first at the next top-up.
- Countdowns: none are sent on any broker; a delayed retry waits in the database until due.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from amqp.exceptions import NotFound
from celery.app.amqp import AMQP, Queues
from kombu import Connection, Exchange, Queue

from shared.config import Settings

SCHEMES = ("amqp", "amqps", "pyamqp")
DELIVERY_LIMIT = 10


def is_rabbitmq(broker_url: str) -> bool:
    return broker_url.split("://", 1)[0] in SCHEMES


def queue_arguments(settings: Settings) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-consumer-timeout": settings.visibility_timeout * 1000,
    }


def quorum_amqp(settings: Settings) -> type[AMQP]:
    """Celery's AMQP with every queue, named in settings or met later (a pool's), declared alike: a queue
    redeclared with other arguments is refused by the broker."""
    arguments = queue_arguments(settings)

    class QuorumQueues(Queues):
        def new_missing(self, name: str) -> Queue:
            return quorum_queue(name, arguments)

    class QuorumAMQP(AMQP):
        queues_cls = QuorumQueues

    return QuorumAMQP


def quorum_queue(name: str, arguments: dict[str, Any]) -> Queue:
    return Queue(name, Exchange(name), name, queue_arguments=arguments)


def ready_messages(broker_url: str, queues: Iterable[str]) -> dict[str, int]:
    """Messages ready in each queue (0 for one not declared yet); raises OSError or an AMQP error when the
    broker is away."""
    depths = {}
    with Connection(broker_url, connect_timeout=2) as connection:
        for queue in queues:
            channel = connection.channel()
            try:
                depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except NotFound:  # it closed the channel
                depths[queue] = 0
            else:
                channel.close()
    return depths
