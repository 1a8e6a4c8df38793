"""Log lines as text or, for a log pipeline, as one JSON object each, with the job and task they concern.

`ARCHFARM_LOG_FORMAT=json` turns every record into `{"time", "level", "logger", "message", "job_id",
"task_id", ...}`; the ids come from `bound(...)`, which a worker enters around each task it is handed, so
every line logged while a task is handled carries them without each call site repeating them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone

_context: ContextVar[dict[str, str]] = ContextVar("archfarm_log_context", default={})  # noqa: B039 - never mutated


@contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Within the block, this thread's log records carry `ids` (None values are left out)."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context.get(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    """The usual line, with the bound ids appended where there are any."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={v}" for k, v in _context.get().items())
        return f"{line} [{ids}]" if ids else line


def configure(log_format: str, level: int = logging.INFO) -> None:
    """One handler on stderr for the root logger, in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler()
    text = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TextFormatter(text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
