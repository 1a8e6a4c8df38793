"""The kinds of job, and what every process knows of each: its spec model, how a document becomes one, and
how long one of its tasks may run.

A document names its kind (`kind: train`); one that names none is a render job, as every job was before
kinds existed. A stored job's kind is a column of its own (`jobs.kind`), so nothing ever guesses a kind from
a spec's fields. Adding a kind: its spec model here, its submission in `producer.kinds`, its worker handler in
`workers.lifecycle`, and a migration adding the value to `jobs.kind`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.db.models import JobKind
from shared.errors import InvalidInput
from shared.limits import task_time_limit
from shared.spec import MAX_ECHO, JobSpec, Style, load_document
from shared.training import TrainingSpec

Spec = JobSpec | TrainingSpec
Packs = Callable[[str], Style | None]
"""Stored style packs by name (`Farm.pack`)."""
SPECS: dict[JobKind, type[JobSpec] | type[TrainingSpec]] = {JobKind.RENDER: JobSpec, JobKind.TRAIN: TrainingSpec}


def kind_of(document: Any, source: str = "") -> JobKind:
    """The kind a loaded document names (render when it names none); InvalidInput for an unknown one."""
    named = document.get("kind", JobKind.RENDER.value) if isinstance(document, dict) else JobKind.RENDER.value
    try:
        return JobKind(named)
    except ValueError:
        kinds = ", ".join(kind.value for kind in JobKind)
        where = f"{source}: " if source else ""
        raise InvalidInput(f"{where}kind: {str(named)[:MAX_ECHO]!r} is none of {kinds}") from None


def parse_spec(document: Any, source: str = "", folder: Path | None = None, packs: Packs | None = None) -> Spec:
    """A loaded document as the spec of its kind; relative paths in it taken relative to `folder`, a render
    job's style names looked up in `packs` (stored style packs) before the built-in styles."""
    kind = kind_of(document, source)
    if kind is JobKind.RENDER:
        return JobSpec.from_document(document, source, folder, packs)
    return SPECS[kind].from_document(document, source, folder)


def load_spec(path: Path, packs: Packs | None = None) -> Spec:
    """A job file of any kind (YAML or JSON)."""
    return parse_spec(load_document(path), str(path), path.parent, packs)


def stored_spec(kind: JobKind, spec: dict[str, Any]) -> Spec:
    """A stored job's spec, by its stored kind (validated at submit: parsing it again checks nothing new)."""
    return SPECS[kind].model_validate(spec)


def time_limit(spec: Spec, settings: Settings) -> int | None:
    """How long one of its tasks may run before Celery stops it; None: never (a training run resumes from its
    checkpoints wherever it is delivered, however long it takes)."""
    return task_time_limit(spec.profile, settings) if isinstance(spec, JobSpec) else None
