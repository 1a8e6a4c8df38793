"""The Celery application's configuration and the one way tasks are sent.

Producers and workers build the same app from settings (`shared.celery_app` is it alone, for Celery's own
tools). Messages carry a task id (and its job's, for those tools); everything else is read from the database,
so a message can be re-sent at any time (retry, reaper, shutdown) without harm.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

from amqp.exceptions import AMQPError
from celery import Celery
from kombu.exceptions import KombuError
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db.models import Job, Task
from shared.errors import BrokerUnavailable, ConfigError
from shared.kinds import stored_spec, time_limit
from shared.rabbitmq import CONSUMER_TIMEOUT_S, QuorumAMQP, is_rabbitmq, quorum_queue, ready_messages

RENDER_TASK = "archfarm.render"
PRIORITY_LEVELS = 10
JOB_PRIORITIES = range(101)
"""A job's priority, 0-100, higher first."""
_CHUNK = 1000  # ids per IN (...) query, well under every backend's bound-parameter limit
SEND_CHUNK = 1000
"""Messages sent over one broker connection: a 200,000-task submit reports progress and fails soon."""
T = TypeVar("T")


def make_celery(settings: Settings) -> Celery:
    """Celery configured for long GPU tasks: JSON only, late acks, one message per worker at a time; on
    RabbitMQ, quorum queues (`shared.rabbitmq`)."""
    if not settings.broker_url:
        raise ConfigError("no broker configured: set ARCHFARM_BROKER_URL (e.g. redis://host:6379/0)")
    rabbitmq = is_rabbitmq(settings.broker_url)
    if rabbitmq and settings.visibility_timeout > CONSUMER_TIMEOUT_S:
        raise ConfigError(
            f"ARCHFARM_VISIBILITY_TIMEOUT={settings.visibility_timeout} lets tasks run past RabbitMQ queues' consumer "
            f"timeout of {CONSUMER_TIMEOUT_S} s: lower it"
        )
    app = Celery("archfarm", broker=settings.broker_url, set_as_current=False, amqp=QuorumAMQP if rabbitmq else None)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # state lives in the database, not in a result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A worker reserves no message beside the one it renders (Celery ≥ 5.6, Redis only; kombu's Redis QoS
        # otherwise lets reservations drift under late acks): a scaled-down or stopped worker hoards nothing.
        # RabbitMQ's prefetch of 1 is exact already.
        worker_disable_prefetch=not rabbitmq,
        task_default_queue=settings.queue,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_rabbitmq_options() if rabbitmq else _redis_options(settings),
        # Events and heartbeats: what Flower and `celery events` show (a few small messages per task).
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    if rabbitmq:
        app.conf.task_queues = [quorum_queue(settings.queue)]
    return app


def _redis_options(settings: Settings) -> dict[str, Any]:
    return {
        # Above the longest task (submit refuses longer ones), or a running task is delivered twice.
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        "priority_steps": list(range(PRIORITY_LEVELS)),
        "sep": ":",
    }


def _rabbitmq_options() -> dict[str, Any]:
    # A send returns once the quorum queue has stored the message on a majority of its nodes.
    return {"confirm_publish": True}


def queue_depth(client: Redis, queue: str) -> int:
    """Messages waiting in `queue`: kombu's Redis transport keeps one list per priority step (`QUEUE`, then
    `QUEUE:1` ... with this app's separator)."""
    keys = [queue, *(f"{queue}:{level}" for level in range(1, PRIORITY_LEVELS))]
    return sum(int(client.llen(key)) for key in keys)


def queue_depths(broker_url: str, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue, on either broker; raises `BrokerUnavailable` when it is away."""
    try:
        if is_rabbitmq(broker_url):
            return ready_messages(broker_url, queues)
        if not broker_url.startswith(("redis://", "rediss://", "unix://")):
            return {}  # a transport whose queues this farm does not read
        client = Redis.from_url(broker_url, socket_timeout=2)
        try:
            return {queue: queue_depth(client, queue) for queue in queues}
        finally:
            client.close()
    except (OSError, KombuError, AMQPError, RedisError) as error:
        raise BrokerUnavailable(f"the broker did not answer: {error}") from error


def broker_priority(job_priority: int) -> int:
    """Job priority 0-100 (higher first) to the Redis transport's 0-9 (lower first)."""
    return round((100 - job_priority) * (PRIORITY_LEVELS - 1) / 100)


@dataclass(frozen=True, slots=True)
class Message:
    """What a task's message needs besides its id: its job's queue, where it sorts there and how long it may
    run."""

    task_id: str
    job_id: str
    """Not needed by the worker (it reads the task's row); there for Celery's own tools (`inspect active`,
    Flower), which show a message's arguments."""
    queue: str
    priority: int
    time_limit: int | None
    """None for a training task: it runs for hours, resumable from its checkpoints, and is never cut short."""


def messages_for(sessions: sessionmaker[Session], settings: Settings, task_ids: Iterable[str]) -> list[Message]:
    """Messages for stored tasks (retry, reaper, sweeper, shutdown), in the order given, each to the queue
    recorded on its job: a re-send never moves a job to other workers."""
    ids = list(task_ids)
    found: dict[str, Message] = {}
    limits: dict[str, int | None] = {}
    with sessions() as session:
        for start in range(0, len(ids), _CHUNK):
            rows = session.execute(
                select(Task.id, Task.job_id, Job.queue, Job.priority, Job.kind, Job.spec)
                .join(Job, Job.id == Task.job_id)
                .where(Task.id.in_(ids[start : start + _CHUNK]))
            )
            for task_id, job_id, queue, priority, kind, spec in rows:
                if job_id not in limits:
                    limits[job_id] = time_limit(stored_spec(kind, spec), settings)
                found[task_id] = Message(task_id, job_id, queue, priority, limits[job_id])
    return [found[i] for i in ids if i in found]


def send_tasks(app: Celery, messages: Iterable[Message]) -> int:
    """Send one message per task, in order, a connection per chunk of `SEND_CHUNK`; returns how many were
    sent. Raises `BrokerUnavailable` when the broker refuses; the tasks not sent stay queued in the database,
    and the sweeper sends them once they are overdue.

    Order matters: a job's tasks share one model stack, and sending them back to back lets every worker
    keep its stack resident instead of swapping between jobs.
    """
    sent = 0
    for chunk in _batched(messages, SEND_CHUNK):
        try:
            sent += _send_chunk(app, chunk)
        except (OSError, KombuError, AMQPError, RedisError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise BrokerUnavailable(f"the broker refused messages after {sent} were sent: {reason}") from error
    return sent


def _send_chunk(app: Celery, messages: Sequence[Message]) -> int:
    rabbitmq = is_rabbitmq(app.conf.broker_url)
    with app.producer_or_acquire() as producer:
        for message in messages:
            app.send_task(
                RENDER_TASK,
                args=[message.task_id],
                kwargs={"job_id": message.job_id},
                queue=message.queue,
                # Redis's priority steps; RabbitMQ's quorum queues read priorities otherwise (4.x: 5 and
                # over are "high"), and the window's order decides there.
                priority=None if rabbitmq else broker_priority(message.priority),
                time_limit=message.time_limit,
                soft_time_limit=None if message.time_limit is None else int(message.time_limit * 0.9),
                producer=producer,
            )
    return len(messages)


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
