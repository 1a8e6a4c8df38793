"""What the benchmarks share: a throwaway PostgreSQL database, the environment and CPU workers of a test farm,
and timing two things side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

from sqlalchemy import create_engine, func, select, text

from producer.client import Farm
from shared.config import Settings
from shared.db.models import Worker
from shared.db.session import make_engine, upgrade

POSTGRES_URL = os.environ.get("ARCHFARM_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ARCHFARM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new database upgraded to head; dropped afterwards, whatever happens."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def farm_environment(database_url: str, work: Path, models_dir: Path, queue_prefix: str) -> None:
    """Point this process (and the workers it starts) at the scratch database, a fresh queue and a local
    storage folder inside `work`."""
    os.environ.update(
        {
            "ARCHFARM_DATABASE_URL": database_url,
            "ARCHFARM_BROKER_URL": REDIS_URL,
            "ARCHFARM_QUEUE": f"{queue_prefix}-{uuid.uuid4().hex[:8]}",
            "ARCHFARM_MODELS_DIR": str(models_dir),
            "ARCHFARM_STORAGE_URL": str(work / "storage"),
            "HF_HUB_OFFLINE": "1",
        }
    )


@contextmanager
def cpu_workers(count: int, work: Path) -> Iterator[Farm]:
    """`archfarm worker --devices cpu:COUNT` running until the block ends, and a Farm client once all are up."""
    log = work / f"worker-{count}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "worker", "--devices", f"cpu:{count}"],
        env={**os.environ},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    farm = Farm(Settings())
    try:
        deadline = time.monotonic() + 120
        while live_workers(farm) < count:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"workers did not start; see {log}")
            time.sleep(0.2)
        yield farm
    finally:
        farm.close()
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def live_workers(farm: Farm) -> int:
    with farm.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Worker).where(Worker.stopped_at.is_(None))) or 0)


def side_by_side(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall times of `a` and `b`, called alternately after a warm-up of each, so that drift in the
    machine's speed (shared cores) hits both alike."""
    a()
    b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((a, times[0]), (b, times[1])):
            started = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - started)
    return median(times[0]), median(times[1])


def report(results: dict[str, Any], as_json: bool) -> None:
    """A benchmark's figures as a table, then, with `as_json`, as one JSON object on the last line."""
    width = max(len("measure"), *map(len, results)) + 2
    print(f"{'measure':<{width}}value")
    for key, value in results.items():
        print(f"{key:<{width}}{f'{value:.4g}' if isinstance(value, float) else value}")
    if as_json:
        print(json.dumps(results))
