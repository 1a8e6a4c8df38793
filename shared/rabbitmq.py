"""RabbitMQ as the broker (`ARCHFARM_BROKER_URL=amqp://...`): every queue a quorum queue.

Quorum queues are replicated (Raft) and keep their messages through a node's restart; classic queues are
deprecated for this. What they change, and how the farm meets it:
- Poison messages: a quorum queue counts deliveries, and one delivered `DELIVERY_LIMIT` times without an ack
  is dropped. The farm's own policy fails a task whose deliveries killed their process `crash_attempts`
  times (5 by default) first; the limit is the backstop for a message that kills its worker before the task
  is claimed. Its task is still queued in the database, and the sweeper sends it again once overdue.
- Long tasks: RabbitMQ closes a channel whose consumer holds a delivery past its consumer timeout (30 min by
  default) and redelivers the message. Each queue asks for 24 hours (`x-consumer-timeout`, honoured from
  RabbitMQ 3.12; on older servers set `consumer_timeout` in rabbitmq.conf as high), above every task the farm
  accepts: submit refuses tasks longer than ARCHFARM_VISIBILITY_TIMEOUT, which may not exceed it here.
- Priorities: quorum queues deliver in order (RabbitMQ 4 adds two levels), and messages carry none. The farm
  does not need them: the broker holds only a window of messages (`shared.dispatch`), and each top-up takes
  the waiting tasks by fair share, priority and deadline, so a raised priority goes first at the next top-up.
- Countdowns: none are sent on any broker; a delayed retry waits in the database until due.
"""

from __future__ import annotations

from collections.abc import Iterable

from amqp.exceptions import NotFound
from celery.app.amqp import AMQP, Queues
from kombu import Connection, Exchange, Queue

SCHEMES = ("amqp", "amqps", "pyamqp")
DELIVERY_LIMIT = 10
CONSUMER_TIMEOUT_S = 24 * 3600
"""Above the longest task the farm accepts (ARCHFARM_VISIBILITY_TIMEOUT, 6 h by default, may not exceed it). A
constant, not derived from a setting: a queue redeclared with other arguments is refused by the broker."""
ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-delivery-limit": DELIVERY_LIMIT,
    "x-consumer-timeout": CONSUMER_TIMEOUT_S * 1000,
}


def is_rabbitmq(broker_url: str) -> bool:
    return broker_url.split("://", 1)[0] in SCHEMES


class QuorumQueues(Queues):
    """Every queue met after the app was built (a pool's) declared as the configured ones are: a queue
    redeclared with other arguments is refused by the broker."""

    def new_missing(self, name: str) -> Queue:
        return quorum_queue(name)


class QuorumAMQP(AMQP):
    queues_cls = QuorumQueues


def quorum_queue(name: str) -> Queue:
    # A topic exchange: Celery binds each quorum queue to its native delayed delivery, which wants one (the farm
    # sends no countdowns, so it carries nothing; a direct exchange only makes it warn).
    return Queue(name, Exchange(name, type="topic"), name, queue_arguments=ARGUMENTS)


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
