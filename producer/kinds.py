"""Submitting a job of each kind (`shared.kinds`): what is checked before it is stored, the job row and its
tasks, and the task ids to send. One entry per kind; the submit path dispatches on the spec's kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sqlalchemy.orm import Session

from producer.submit import prepare
from producer.training import prepare_training
from shared.config import Settings
from shared.db.models import JobKind
from shared.kinds import Spec


class Prepared(Protocol):
    """A job checked and expanded, ready to be stored (`persist`, in the caller's transaction) and sent."""

    @property
    def id(self) -> str: ...

    @property
    def queue(self) -> str: ...

    @property
    def task_ids(self) -> list[str]: ...

    def persist(self, session: Session) -> None: ...


Prepare = Callable[..., Prepared]
"""(spec, settings, *, owner, remote) → a prepared job of the spec's kind, for a farm's workers."""

PREPARE: dict[JobKind, Prepare] = {
    JobKind.RENDER: lambda spec, settings, **options: prepare(spec, settings, farm=True, **options),
    JobKind.TRAIN: prepare_training,
}


def prepare_for_farm(spec: Spec, settings: Settings, *, owner: str | None = None, remote: bool = False) -> Prepared:
    """Check a spec of any kind for a farm and expand it into its tasks; raises InvalidInput, stores nothing."""
    return PREPARE[JobKind(spec.kind)](spec, settings, owner=owner, remote=remote)
