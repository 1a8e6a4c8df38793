"""Shared fixtures: real services (PostgreSQL, SeaweedFS S3), tiny models, example plans.

A test that needs a service this machine lacks is skipped locally with the reason, but fails under
`CI=true`, so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from producer.client import Farm
from shared.broker import queue_depth
from shared.config import Settings
from shared.db.models import Base
from shared.db.session import make_engine, session_factory, upgrade
from tests.processes import WorkerProcess, live_workers, wait_for

pytest_plugins = ["tests.s3_server", "tests.models_fixture"]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLAN = ROOT / "examples" / "floorplan.png"
POSTGRES_ADMIN_URL = os.environ.get(
    "ARCHFARM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def service_missing(reason: str) -> None:
    """Skip locally; under CI a missing service is a failure, never a silent skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required service missing under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway database on the real PostgreSQL server, upgraded to head, dropped at the end."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"archfarm_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 - any connection failure means "no server here"
        admin.dispose()
        service_missing(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {type(e).__name__}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def empty_postgres(url: str) -> None:
    """Remove every row, keeping the schema: far cheaper than a new database per test."""
    engine = make_engine(url)
    with engine.begin() as connection:
        # A connection left in a transaction holds locks TRUNCATE waits on: fail the teardown, never hang it.
        connection.execute(text("SET LOCAL lock_timeout = '30s'"))
        names = ", ".join(t.name for t in reversed(Base.metadata.sorted_tables))
        connection.execute(text(f"TRUNCATE {names} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test runs on both backends: a fresh SQLite file, and the PostgreSQL test database emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    empty_postgres(url)


@pytest.fixture
def fresh_database(postgres_url: str) -> Iterator[str]:
    """An empty PostgreSQL database: no schema at all, as a new farm's before `archfarm db upgrade`."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"archfarm_fresh_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


REDIS_SERVER_URL = os.environ.get("ARCHFARM_TEST_REDIS_URL", "redis://127.0.0.1:6379")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A database of the real Redis server for this test session alone (1-15, claimed on the server, so
    sessions running side by side never share one), emptied before and after."""
    server = REDIS_SERVER_URL.rstrip("/")
    if server.count("/") > 2:  # a URL naming a database: the server is what matters here
        server = server.rsplit("/", 1)[0]
    claims = redis.Redis.from_url(f"{server}/0", socket_connect_timeout=2)
    try:
        claims.ping()
    except redis.RedisError as e:
        service_missing(f"Redis not reachable at {server}: {type(e).__name__}")
    for number in range(1, 16):
        claim = f"archfarm-test:db:{number}"
        if claims.set(claim, os.getpid(), nx=True, ex=6 * 3600):
            break
    else:
        service_missing(f"every Redis database 1-15 of {server} is claimed by other test sessions")
    url = f"{server}/{number}"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()
    claims.delete(claim)


@pytest.fixture
def example_plan() -> Path:
    return EXAMPLE_PLAN


@pytest.fixture
def farm_env(
    postgres_url: str, redis_url: str, s3_server, s3_bucket: str, models_dir: Path, tmp_path: Path
) -> Iterator[dict[str, str]]:
    queue = f"archfarm-test-{uuid.uuid4().hex[:8]}"
    env = {
        "ARCHFARM_BROKER_URL": redis_url,
        "ARCHFARM_DATABASE_URL": postgres_url,
        "ARCHFARM_STORAGE_URL": f"s3://{s3_bucket}/renders",
        "ARCHFARM_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "ARCHFARM_S3_REGION": s3_server.region,
        "ARCHFARM_MODELS_DIR": str(models_dir),
        "ARCHFARM_QUEUE": queue,
        "ARCHFARM_HEARTBEAT_INTERVAL": "0.5",
        "ARCHFARM_HEARTBEAT_TIMEOUT": "4",
        "HF_HUB_OFFLINE": "1",
    }
    yield env
    empty_postgres(postgres_url)
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{queue}*"):
        client.delete(key)


@pytest.fixture
def farm(farm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Farm]:
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    with Farm(Settings()) as client:
        yield client


def queued_messages(broker_url: str, queue: str) -> int:
    """Messages waiting in a queue, over kombu's per-priority Redis lists (`QUEUE`, `QUEUE:N`)."""
    return queue_depth(redis.Redis.from_url(broker_url), queue)


@pytest.fixture
def start_workers(farm_env: dict[str, str], farm: Farm, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(devices: str = "cpu:1", expect: int = 1, *options: str) -> WorkerProcess:
        before = live_workers(farm)
        worker = WorkerProcess(farm_env, devices, tmp_path / f"worker-{len(started)}.log", *options)
        started.append(worker)
        wait_for(lambda: live_workers(farm) >= before + expect, 120, f"workers to start ({worker.log})")
        return worker

    yield start
    for worker in started:
        worker.terminate()
    for worker in started:
        worker.wait()
        assert worker.proc.returncode is not None
