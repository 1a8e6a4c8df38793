"""`/metrics` for Prometheus: the farm's state, read from the database and the broker at each scrape.

Workers run on many machines and restart; what they did is already recorded in the database (task rows,
artifacts, their heartbeat rows), so one exporter beside the API reports the whole farm, with no metrics
endpoint per worker to discover. Histograms are rebuilt from the task rows of recent jobs at each scrape.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from producer.client import Farm
from shared.broker import queue_depths
from shared.config import Settings
from shared.db import costs
from shared.db.clock import aware, database_time, db_now
from shared.db.models import Job, JobCounts, Task, TaskStatus, Worker
from shared.db.shares import over_quota_owners
from shared.dispatch import live_workers
from shared.errors import BrokerUnavailable

RENDER_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
"""Seconds per task, claim to done: a tiny CPU render takes under a second, an SDXL batch minutes."""
RECENT_S = 24 * 3600
"""Jobs reported: those created within this many seconds."""
RECENT_TASKS = 10_000
"""Tasks the duration histogram is drawn from: the latest finished within `RECENT_S` (a million-task job's
scrape reads these through the `finished_at` index, not the job)."""


class FarmCollector(Collector):
    """Registered once per API process; `farm` gives the API's `Farm` (created when the app starts)."""

    def __init__(self, farm: Callable[[], Farm]) -> None:
        self.farm = farm

    def collect(self) -> Iterator[Metric]:
        farm = self.farm()
        with farm.sessions() as session:
            yield from _tasks(session)
            yield from _workers(session)
            yield from _capacity(session, farm.settings)
        yield from _queues(farm.sessions, farm.settings)


def _tasks(session: Session) -> Iterator[Metric]:
    since = db_now(-RECENT_S)
    tasks = GaugeMetricFamily("archfarm_tasks", "Tasks of recent jobs by status", labels=["job", "name", "status"])
    rows = session.execute(
        select(Job.id, Job.name, JobCounts).join(JobCounts, JobCounts.job_id == Job.id).where(Job.created_at >= since)
    )
    for job_id, name, counts in rows:
        for status, count in counts.by_status().items():
            tasks.add_metric([job_id, name, status.value], count)
    yield tasks
    images = CounterMetricFamily("archfarm_images_rendered", "Images written, all jobs")
    images.add_metric([], int(session.scalar(select(func.sum(JobCounts.images))) or 0))
    yield images
    durations = session.execute(
        select(Task.started_at, Task.finished_at)
        .where(Task.finished_at >= since, Task.status == TaskStatus.SUCCEEDED, Task.started_at.is_not(None))
        .order_by(Task.finished_at.desc())
        .limit(RECENT_TASKS)
    )
    seconds = sorted((aware(done) - aware(start)).total_seconds() for start, done in durations if done is not None)
    buckets = [(str(bound), bisect_right(seconds, bound)) for bound in RENDER_BUCKETS]
    histogram = HistogramMetricFamily(
        "archfarm_task_seconds", f"Seconds from claim to done of the latest {RECENT_TASKS} tasks that succeeded"
    )
    histogram.add_metric([], [*buckets, ("+Inf", len(seconds))], sum(seconds))
    yield histogram


def _workers(session: Session) -> Iterator[Metric]:
    labels = ["worker", "node", "device"]
    heartbeat = GaugeMetricFamily(
        "archfarm_worker_heartbeat_age_seconds", "Since a live worker's last heartbeat", labels=labels
    )
    images = CounterMetricFamily("archfarm_worker_images", "Images a live worker has rendered", labels=labels)
    loads = CounterMetricFamily("archfarm_worker_model_loads", "Models a live worker has loaded", labels=labels)
    swaps = CounterMetricFamily("archfarm_worker_stack_swaps", "Model stack changes of a live worker", labels=labels)
    resident = GaugeMetricFamily(
        "archfarm_worker_resident_models", "Models resident on a live worker's device", labels=labels
    )
    current = database_time(session)
    for row in session.scalars(select(Worker).where(Worker.stopped_at.is_(None))):
        key = [row.id, row.node, row.device]
        heartbeat.add_metric(key, (current - aware(row.heartbeat_at)).total_seconds())
        images.add_metric(key, row.images_done)
        loads.add_metric(key, row.model_loads)
        swaps.add_metric(key, row.stack_swaps)
        resident.add_metric(key, len(row.models))
    yield from (heartbeat, images, loads, swaps, resident)


def _queues(sessions: sessionmaker[Session], settings: Settings) -> Iterator[Metric]:
    """Messages waiting per queue of recent jobs: over kombu's per-priority Redis lists, or RabbitMQ's ready
    messages."""
    depth = GaugeMetricFamily("archfarm_queue_messages", "Messages waiting in a broker queue", labels=["queue"])
    if settings.broker_url:
        with sessions() as session:
            queues = set(session.scalars(select(Job.queue).where(Job.created_at >= db_now(-RECENT_S))))
        try:
            for queue, messages in queue_depths(settings.broker_url, sorted({*queues, settings.queue})).items():
                depth.add_metric([queue], messages)
        except BrokerUnavailable:
            pass  # the broker is away: no depth this scrape, the rest still reports
    yield depth


def _capacity(session: Session, settings: Settings) -> Iterator[Metric]:
    """Per pool: the GPU-seconds of work queued or running (`shared.db.costs`) and the live workers that take
    it, what an autoscaler scales on."""
    backlog = GaugeMetricFamily(
        "archfarm_backlog_seconds",
        "GPU-seconds of a pool's running images and of those queued that a worker may take (not paused, not held "
        "by a quota)",
        labels=["pool"],
    )
    capacity = GaugeMetricFamily("archfarm_capacity", "Live workers consuming a pool's queue", labels=["pool"])
    work = costs.backlog(session, over_quota_owners(session, settings))
    live = live_workers(session, settings.heartbeat_timeout)
    for queue in sorted(set(work) | set(live) | {settings.queue}):
        backlog.add_metric([settings.pool_of(queue)], work.get(queue, 0.0))
        capacity.add_metric([settings.pool_of(queue)], live[queue])
    yield from (backlog, capacity)
