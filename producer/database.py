"""Opening the state database from settings, upgrading SQLite by itself on the embedded path."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db.session import make_engine, require_schema, session_factory, upgrade


def open_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    """SQLite files are upgraded in place (the embedded default needs no setup); a server database must
    be upgraded by an operator, so a deploy never migrates production behind anyone's back."""
    engine = make_engine(settings.database_url)
    if engine.dialect.name == "sqlite":
        upgrade(engine)
    else:
        require_schema(engine)
    return engine, session_factory(engine)
