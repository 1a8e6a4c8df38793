"""State store at scale on PostgreSQL: expanding and persisting huge jobs, status and update latency while the
tables hold them, and the broker's dispatch rate.

    python bench/state.py [--quick] [--json]

Needs PostgreSQL and Redis on 127.0.0.1 (ARCHFARM_BENCH_POSTGRES_URL / ARCHFARM_BENCH_REDIS_URL override);
uses a throwaway database and queue and removes both.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from pathlib import Path
from statistics import quantiles
from typing import Any

import redis
from sqlalchemy import select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REDIS_URL, report, scratch_database
from producer.expand import expand
from producer.submit import PreparedJob, persist
from shared.broker import Message, make_celery, send_tasks
from shared.config import Settings
from shared.db.models import Job, Task
from shared.db.session import make_engine, session_factory
from shared.db.store import claim_task, finish_task, status_of
from shared.plans import Plan
from shared.spec import JobSpec

PROFILE = {"base": "tiny-sd15", "width": 512, "height": 512, "steps": 20, "controls": [{"kind": "canny"}]}


def fake_job(plans: int, seeds: int) -> tuple[JobSpec, list[Plan]]:
    """plans × 1 style × seeds tasks; plans are made up (expansion is pure, nothing is read)."""
    refs = [Plan(url=f"s3://bench/plans/{i}.png", name=f"plan-{i}", digest=f"{i:064x}") for i in range(plans)]
    spec = JobSpec.model_validate(
        {
            "name": "bench",
            "plans": [p.url for p in refs],
            "styles": ["modern"],
            "seeds": {"count": seeds},
            "profile": PROFILE,
        }
    )
    return spec, refs


def percentiles(samples: list[float]) -> tuple[float, float]:
    cuts = quantiles(samples, n=100)
    return cuts[49] * 1000, cuts[94] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 tasks and 2,000 messages only")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args()
    with scratch_database("archfarm_bench") as url:
        results = measure(args, url)
    report(results, args.json)


def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    engine = make_engine(url)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {}
    try:
        sessions = session_factory(engine)
        sizes = [(100, 1000)] if args.quick else [(100, 1000), (1000, 1000)]
        job_ids = []
        for plans, seeds in sizes:
            count = plans * seeds
            spec, refs = fake_job(plans, seeds)
            job_id = str(uuid.uuid4())
            started = time.perf_counter()
            tasks = expand(spec, refs, job_id)
            expanded = time.perf_counter()
            with sessions.begin() as session:
                persist(
                    session,
                    PreparedJob(id=job_id, spec=spec, output_url="s3://bench/out", queue=queue, tasks=tasks),
                )
            stored = time.perf_counter()
            results[f"expand_{count}_s"] = expanded - started
            results[f"persist_{count}_s"] = stored - expanded
            job_ids.append((job_id, [t.id for t in random.sample(tasks, 200)]))
            del tasks
        # What autovacuum does on a live farm soon after a big insert: it sets the visibility map that lets
        # the status query count from the (job_id, status) index alone.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE tasks"))
            results["task_rows"] = connection.scalar(text("SELECT count(*) FROM tasks"))
        job_id, sample = job_ids[-1]
        status_times, done_times = [], []
        for _ in range(50):
            started = time.perf_counter()
            with sessions() as session:
                status_of(session, session.get_one(Job, job_id))
            status_times.append(time.perf_counter() - started)
        for task_id in sample:
            started = time.perf_counter()
            with sessions.begin() as session:
                claim_task(session, task_id, "bench")
                finish_task(session, task_id, "bench")
            done_times.append(time.perf_counter() - started)
        results["status_query_p50_ms"], results["status_query_p95_ms"] = percentiles(status_times)
        results["mark_done_p50_ms"], results["mark_done_p95_ms"] = percentiles(done_times)
        with sessions() as session:
            ids = list(
                session.scalars(select(Task.id).where(Task.job_id == job_id).limit(2000 if args.quick else 10_000))
            )
        app = make_celery(Settings(broker_url=REDIS_URL, queue=queue))
        started = time.perf_counter()
        send_tasks(app, (Message(task_id, job_id, queue, 50, 3600) for task_id in ids))
        results["dispatch_messages"] = len(ids)
        results["dispatch_per_s"] = len(ids) / (time.perf_counter() - started)
    finally:
        engine.dispose()
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{queue}*"):
            client.delete(key)
    return results


if __name__ == "__main__":
    main()
