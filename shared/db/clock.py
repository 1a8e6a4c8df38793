"""The database's clock, as SQL: every time a farm compares (heartbeats, reaping, sweeping, transient
budgets) is read from the one clock all machines share, so a host whose clock drifts cannot declare live
workers dead or keep a task waiting.

`db_now()` and `db_now(offset_s)` are SQL expressions of type timestamp, evaluated by the server:
`now()` on PostgreSQL, `strftime(...)` on SQLite (in the text format SQLAlchemy stores datetimes in there,
so comparisons with stored values hold).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import FunctionElement


class db_now(FunctionElement[datetime]):  # reads as the SQL function it stands for
    """The database's current UTC time, plus `offset_s` seconds (negative: in the past)."""

    type = DateTime(timezone=True)
    inherit_cache = True
    name = "db_now"

    def __init__(self, offset_s: float = 0.0) -> None:
        super().__init__(literal(float(offset_s)))


@compiles(db_now, "postgresql")
def _now_postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    return f"(now() + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    # '%f' gives milliseconds; three zeros make the microseconds SQLAlchemy writes and parses on SQLite.
    offset = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', ({offset}) || ' seconds') || '000')"


def database_time(session: Session) -> datetime:
    """The database's current time, as an aware UTC datetime."""
    return aware(session.scalar(select(db_now())))


def aware(moment: Any) -> datetime:
    """A stored timestamp as an aware UTC datetime (SQLite hands them back naive; they are stored as UTC)."""
    if isinstance(moment, str):  # a bare SQLite expression result
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
