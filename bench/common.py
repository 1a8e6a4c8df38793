"""What the benchmarks share: a throwaway PostgreSQL database on the server they are pointed at."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

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
