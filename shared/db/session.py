"""Engines, sessions and schema upgrades for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import InvalidInput


def make_engine(url: str) -> Engine:
    """An engine tuned per backend; SQLite gets WAL and a busy timeout so several processes can share it."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInput(f"database URL {url!r} is not a SQLAlchemy URL") from None
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    """Alembic's config built in code: the migrations ship inside the package, no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", str(files("shared.db") / "migrations"))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe to call on every start (a no-op when already there)."""
    command.upgrade(alembic_config(engine), revision)
