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
    WAITING_FOR_PICK = "waiting_for_pick"
    """A staged job with nothing left to render and its pick gate open: a person picks drafts, or closes it."""

    @property
    def ended(self) -> bool:
        """Whether the job has ended, however it ended: nothing of it is queued or running."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PARTIALLY_SUCCEEDED)

    @property
    def still(self) -> bool:
        """Whether nothing of the job moves until a person acts: it has ended, or it waits for a pick."""
        return self.ended or self is JobStatus.WAITING_FOR_PICK


def job_status(
    counts: Mapping[TaskStatus, int], cancelled: bool, paused: bool = False, gate_open: bool = False
) -> JobStatus:
    """The outcome a user sees.

    A paused job with work left is `paused` (its running tasks finish, its queued ones wait); otherwise work
    in flight wins; a staged job whose pick gate is open waits for a pick; a cancelled job stays `cancelled`
    even when some images were made before the cancel; a finished job with both successes and failures is
    `partially_succeeded`.
    """
    done = {s: counts.get(s, 0) for s in TaskStatus}
    total = sum(done.values())
    if paused and (done[TaskStatus.QUEUED] or done[TaskStatus.RUNNING]):
        return JobStatus.PAUSED
    if done[TaskStatus.RUNNING] or (done[TaskStatus.QUEUED] and total > done[TaskStatus.QUEUED]):
        return JobStatus.RUNNING
    if done[TaskStatus.QUEUED]:
        return JobStatus.QUEUED
    if gate_open and not cancelled:
        return JobStatus.WAITING_FOR_PICK
    if cancelled or (done[TaskStatus.CANCELLED] and not done[TaskStatus.SUCCEEDED]):
        return JobStatus.CANCELLED
    if done[TaskStatus.SUCCEEDED] == total:
        return JobStatus.SUCCEEDED
    if done[TaskStatus.SUCCEEDED]:
        return JobStatus.PARTIALLY_SUCCEEDED
    return JobStatus.FAILED
