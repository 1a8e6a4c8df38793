"""State store at scale on PostgreSQL: storing huge jobs, then every read path of one while its tables hold it
half done, and the broker's dispatch rate.

    python bench/state.py [--quick] [--json]

Per size (10⁴, 10⁵ and 10⁶ tasks; 10⁴ with --quick): a job of 10 plans × 4 styles × size/40 seeds is submitted
as `Farm.submit` does it (expanded, stored, its first window of messages sent to Redis: submit-to-return, and
the messages and bytes the broker then holds), half its tasks are marked done with an image each (as workers
would leave it mid-run), and each
read path is timed 30 times over HTTP through the API (in-process, no auth): the job (`GET /jobs/{id}`: what
`archfarm status` reads), the jobs list, a page of results, a page of the contact sheet, the dashboard's job
page and `/metrics`; then a task's claim and finish. Needs PostgreSQL and Redis on 127.0.0.1
(ARCHFARM_BENCH_POSTGRES_URL / ARCHFARM_BENCH_REDIS_URL override); uses a throwaway database and queue and
removes both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from statistics import quantiles
from typing import Any

import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REDIS_URL, report, scratch_database
from producer.api import create_app
from producer.expand import expand
from producer.submit import PreparedJob, persist
from shared.broker import Message, make_celery, messages_for, queue_depth, send_tasks
from shared.config import Settings
from shared.db.models import Task
from shared.db.session import make_engine, session_factory
from shared.db.store import claim_task, finish_task
from shared.dispatch import top_up
from shared.plans import Plan
from shared.spec import JobSpec

PROFILE = {"base": "tiny-sd15", "width": 512, "height": 512, "steps": 20, "controls": [{"kind": "canny"}]}
STYLES = ["modern", "japandi", "industrial", "minimalist"]
PLANS = 10
REPEATS = 30


def fake_job(tasks: int) -> tuple[JobSpec, list[Plan]]:
    """10 plans × 4 styles × tasks/40 seeds; plans are made up (expansion is pure, nothing is read)."""
    refs = [Plan(url=f"s3://bench/plans/{i}.png", name=f"plan-{i}", digest=f"{i:064x}") for i in range(PLANS)]
    spec = JobSpec.model_validate(
        {
            "name": "bench",
            "plans": [p.url for p in refs],
            "styles": STYLES,
            "seeds": {"count": tasks // (PLANS * len(STYLES))},
            "profile": PROFILE,
            "output": "s3://bench/out",
        }
    )
    return spec, refs


def percentiles(samples: list[float]) -> tuple[float, float]:
    cuts = quantiles(samples, n=100)
    return round(cuts[49] * 1000, 1), round(cuts[94] * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 tasks and 2,000 messages only")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args()
    with scratch_database("archfarm_bench") as url:
        results = measure(args, url)
    report(results, args.json)


def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    engine = make_engine(url)
    sessions = session_factory(engine)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=url, broker_url=None, api_auth="off", storage_url="s3://bench/farm")
    app, broker = make_celery(Settings(broker_url=REDIS_URL, queue=queue)), redis.Redis.from_url(REDIS_URL)
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # results' links are signed, never fetched
        os.environ.setdefault(variable, "bench")
    results: dict[str, Any] = {}
    try:
        with TestClient(create_app(settings)) as client:
            for size in [10_000] if args.quick else [10_000, 100_000, 1_000_000]:
                job_id = str(uuid.uuid4())
                started = time.perf_counter()
                spec, refs = fake_job(size)
                tasks = expand(spec, refs, job_id)
                with sessions.begin() as session:
                    persist(session, PreparedJob(job_id, spec, "s3://bench/out", queue, tasks))
                with sessions.begin() as session:
                    first = top_up(session, settings, [queue])
                send_tasks(app, messages_for(sessions, settings, first))
                results[f"{size}_submit_s"] = round(time.perf_counter() - started, 2)
                results[f"{size}_broker_messages"] = queue_depth(broker, queue)
                results[f"{size}_broker_kib"] = round(
                    sum(broker.memory_usage(k) or 0 for k in broker.scan_iter(f"{queue}*")) / 1024
                )
                sample = [t.id for t in random.sample(tasks[size // 2 :], 100)]
                del tasks
                half_done(engine, job_id, size // 2)
                results |= {f"{size}_{name}": value for name, value in read_paths(client, job_id).items()}
                times = []
                for task_id in sample:
                    started = time.perf_counter()
                    with sessions.begin() as session:
                        claim_task(session, task_id, "bench")
                        finish_task(session, task_id, "bench")
                    times.append(time.perf_counter() - started)
                results[f"{size}_claim_and_finish_ms"] = percentiles(times)
        with sessions() as session:
            ids = list(session.scalars(select(Task.id).limit(2000 if args.quick else 10_000)))
        started = time.perf_counter()
        send_tasks(app, (Message(task_id, "bench", queue, 50, 3600) for task_id in ids))
        results["dispatch_messages"] = len(ids)
        results["dispatch_per_s"] = round(len(ids) / (time.perf_counter() - started))
    finally:
        engine.dispose()
        for key in broker.scan_iter(f"{queue}*"):
            broker.delete(key)
    return results


def half_done(engine: Any, job_id: str, done: int) -> None:
    """The job's first `done` tasks succeeded, each with its image recorded (one statement each, as a
    farm's workers would leave them over hours), then what autovacuum does soon after."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE tasks SET status = 'succeeded', worker = 'bench', attempts = 1, started_at = now(), "
                "finished_at = now() WHERE job_id = :job AND ordinal < :done"
            ),
            {"job": job_id, "done": done},
        )
        connection.execute(
            text(
                "INSERT INTO artifacts (job_id, task_id, stage, plan_digest, style, seed, url, sidecar_url, width, "
                "height, size_bytes, adherence, look, created_at) SELECT job_id, id, 'render', plan_digest, style, "
                "(seeds->>0)::bigint, 's3://bench/out/' || (outputs->>0), 's3://bench/out/x.json', 512, 512, "
                "400000, 0.5, CAST(:look AS json), now() FROM tasks WHERE job_id = :job AND status = 'succeeded'"
            ),
            {"job": job_id, "look": json.dumps([1 / 8] * 8 + [1 / 36] * 36 + [1 / 8] * 8)},  # as workers store one
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))


def read_paths(client: TestClient, job_id: str) -> dict[str, tuple[float, float]]:
    """p50 and p95 in ms of each read path, over HTTP through the API."""
    paths: dict[str, Callable[[], Any]] = {
        "job_ms": lambda: client.get(f"/jobs/{job_id}"),
        "jobs_list_ms": lambda: client.get("/jobs?limit=20"),
        "results_page_ms": lambda: client.get(f"/jobs/{job_id}/results?limit=100"),
        "sheet_page_ms": lambda: client.get(f"/jobs/{job_id}/sheet?rows=20&seeds=20"),
        "dashboard_job_ms": lambda: client.get(f"/ui/jobs/{job_id}"),
        "metrics_ms": lambda: client.get("/metrics"),
    }
    found = {}
    for name, call in paths.items():
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            response = call()
            times.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise SystemExit(f"{name}: HTTP {response.status_code}: {response.text[:300]}")
        found[name] = percentiles(times)
    return found


if __name__ == "__main__":
    main()
