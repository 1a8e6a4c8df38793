"""Engines, sessions and schema upgrades for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from shared.db.models import Base
from shared.errors import ConfigError, DatabaseUnavailable, SchemaOutdated

DATABASE_DOWN = (OperationalError, InterfaceError)
"""What SQLAlchemy raises when the database does not answer (as opposed to a query it refuses)."""


def make_engine(url: str) -> Engine:
    """An engine tuned per backend; SQLite gets WAL and a busy timeout so several processes can share it."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"database URL {url!r} is not a SQLAlchemy URL") from None
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


def dialect_insert(session: Session, table: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT for the session's database that can say ON CONFLICT (PostgreSQL's or SQLite's dialect)."""
    return (postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert)(table)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that refuse work once closed: a query after its `with` block would otherwise begin a new
    transaction that holds its locks until the garbage collector happens by."""
    return sessionmaker(engine, expire_on_commit=False, close_resets_only=False)


def alembic_config(engine: Engine) -> Config:
    """Alembic's config built in code: the migrations ship inside the package, no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", str(files("shared.db") / "migrations"))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe to call on every start (a no-op when already there)."""
    try:
        command.upgrade(alembic_config(engine), revision)
    except OperationalError as error:
        raise unreachable(engine, error) from None


def unreachable(engine: Engine, error: OperationalError) -> DatabaseUnavailable:
    """One line for a database that does not answer, saying how to create it when the server answers but has no
    database by that name (a new farm's first `archfarm db upgrade`)."""
    url = engine.url
    where = url.render_as_string(hide_password=True)
    if _missing_database(url):
        create = f"createdb -h {url.host or 'localhost'} -p {url.port or 5432} -U {url.username or 'postgres'}"
        return DatabaseUnavailable(
            f"database {url.database!r} does not exist at {where}: create it first ({create} {url.database})"
        )
    return DatabaseUnavailable(f"cannot reach the database {where}: {str(error.orig).strip().splitlines()[0]}")


def _missing_database(url: URL) -> bool:
    """Whether a PostgreSQL server answers on its maintenance database but holds none named as `url` says."""
    if url.get_backend_name() != "postgresql" or not url.database:
        return False
    probe = create_engine(url.set(database="postgres"))
    try:
        with probe.connect() as connection:
            found = connection.scalar(
                text("SELECT count(*) FROM pg_database WHERE datname = :name"), {"name": url.database}
            )
    except SQLAlchemyError:
        return False
    finally:
        probe.dispose()
    return found == 0


def require_schema(engine: Engine) -> None:
    """Refuse a database whose schema is not the one this code was written for (one line, the fix in it).

    Producers and workers alike check it before they touch a table: a worker against an old schema would
    take tasks and fail every one of them."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as error:
        raise unreachable(engine, error) from None
    if current != head:
        raise SchemaOutdated(
            f"database schema is at {current or 'nothing'}, this archfarm needs {head}: run `archfarm db upgrade`"
        )
