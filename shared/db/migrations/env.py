"""Alembic environment: runs against the engine handed over in `config.attributes`."""

from __future__ import annotations

from alembic import context

from shared.db.models import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # SQLite alters a table by copying it, dropping the old one and renaming the copy (batch mode): with
        # foreign keys on, that drop would delete every row referring to it (ON DELETE CASCADE), as a tasks
        # table rebuilt would take the artifacts with it. Off while migrating (it can only change outside a
        # transaction), then checked and on again.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    with connection.begin():
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=sqlite)
        context.run_migrations()
    if sqlite:
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()
        if broken:
            raise RuntimeError(f"the migration left rows referring to nothing: {broken[:5]}")
