"""Log lines as text or, for a log pipeline, as one JSON object each, with the job and task they concern.

`ARCHFARM_LOG_FORMAT=json` turns every record into `{"time", "level", "logger", "message", "job_id",
"task_id", ...}`; the ids come from `bound(...)`, which a worker enters around each task it is handed, so
every line logged while a task is handled carries them without each call site repeating them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone

from shared.errors import one_line

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


class Outage:
    """One dependency (the database, the broker) as this process sees it: an outage is logged once when it
    starts and once when it ends, however many heartbeats, retries and threads meet it in between."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self.what = what
        self.log = logger
        self._since: float | None = None
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        self.log.error("%s unreachable, retrying until it answers: %s", self.what, one_line(error))

    def answered(self) -> None:
        with self._lock:
            if self._since is None:
                return
            lasted, self._since = time.monotonic() - self._since, None
        self.log.warning("%s answers again, after %.0f s", self.what, lasted)


_outages: dict[str, Outage] = {}
_outages_lock = threading.Lock()


def outage(what: str) -> Outage:
    """The process's one tracker for `what`, shared by every thread that talks to it."""
    with _outages_lock:
        return _outages.setdefault(what, Outage(what, logging.getLogger("archfarm.outage")))
