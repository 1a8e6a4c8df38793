"""Job status, derived from task counts rather than stored, so it is always consistent with the tasks."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from shared.db.models import TaskStatus


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    PAUSED = "paused"

    @property
    def ended(self) -> bool:
        """Whether the job has ended, however it ended: nothing of it is queued or running."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PARTIALLY_SUCCEEDED)


def job_status(counts: Mapping[TaskStatus, int], cancelled: bool, paused: bool = False) -> JobStatus:
    """The outcome a user sees.

    A paused job with work left is `paused` (its running tasks finish, its queued ones wait); otherwise work
    in flight wins; a cancelled job stays `cancelled` even when some images were made before the cancel; a
    finished job with both successes and failures is `partially_succeeded`.
    """
    done = {s: counts.get(s, 0) for s in TaskStatus}
    total = sum(done.values())
    if paused and (done[TaskStatus.QUEUED] or done[TaskStatus.RUNNING]):
        return JobStatus.PAUSED
    if done[TaskStatus.RUNNING] or (done[TaskStatus.QUEUED] and total > done[TaskStatus.QUEUED]):
        return JobStatus.RUNNING
    if done[TaskStatus.QUEUED]:
        return JobStatus.QUEUED
    if cancelled or (done[TaskStatus.CANCELLED] and not done[TaskStatus.SUCCEEDED]):
        return JobStatus.CANCELLED
    if done[TaskStatus.SUCCEEDED] == total:
        return JobStatus.SUCCEEDED
    if done[TaskStatus.SUCCEEDED]:
        return JobStatus.PARTIALLY_SUCCEEDED
    return JobStatus.FAILED
