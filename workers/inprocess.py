"""The transport of the embedded farm (`archfarm render`, `Farm` without a broker): no broker, no processes.

Tasks are delivered to the lifecycle in this thread, in the order sent; a task sent back with a delay (a
transient error's backoff) waits in a local queue until it is due, and the run ends when nothing is left.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class InProcessQueue:
    """A delay queue of task ids, filled by `send` (from the render and the upload thread alike)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()

    def send(self, task_ids: list[str], delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        with self._lock:
            for task_id in task_ids:
                heapq.heappush(self._heap, (due, next(self._order), task_id))

    def drain(self, run: Callable[[str], object], flush: Callable[[], None]) -> None:
        """Deliver every task, each when it is due, until the queue is empty and every upload recorded
        (`flush`): an upload that fails sends its task back here."""
        while True:
            with self._lock:
                item = heapq.heappop(self._heap) if self._heap else None
            if item is None:
                flush()
                with self._lock:
                    if not self._heap:
                        return
                continue
            due, _, task_id = item
            time.sleep(max(0.0, due - time.monotonic()))
            run(task_id)
