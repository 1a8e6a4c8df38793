"""Opening the state database from settings, upgrading SQLite by itself on the embedded path."""

from __future__ import annotations

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db.session import alembic_config, make_engine, session_factory, upgrade
from shared.errors import ArchfarmError


class SchemaOutdated(ArchfarmError):
    """The server database is not at the schema this code expects: run `archfarm db upgrade`."""


def open_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    """SQLite files are upgraded in place (the embedded default needs no setup); a server database must
    be upgraded by an operator, so a deploy never migrates production behind anyone's back."""
    engine = make_engine(settings.database_url)
    if engine.dialect.name == "sqlite":
        upgrade(engine)
    else:
        head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        if current != head:
            raise SchemaOutdated(
                f"database schema is at {current or 'nothing'}, this archfarm needs {head}: run `archfarm db upgrade`"
            )
    return engine, session_factory(engine)
