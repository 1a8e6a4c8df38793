"""One exception tree for archfarm.

Callers branch on the *kind* of failure, never on message text. Five kinds, each with one meaning wherever it
is raised:

- `InvalidInput`: what the user gave is wrong (job, profile, plan, name, URL); nothing was stored or queued.
  CLI exit 2 with one line, HTTP 422.
- `NotFound`: the job (or sidecar, or task) named does not exist. CLI exit 2, HTTP 404.
- `ConfigError`: the farm itself is not set up to do this (no broker, an outdated schema, a device the
  machine does not have). CLI exit 2, HTTP 503.
- `TransientError`: storage, database or broker away for a moment; the same work may succeed later.
- `PermanentError`: a task that cannot succeed by retrying (a missing model, a plan edited after submit); an
  `InputError` when the task's own input is at fault, which fails every queued task sharing that input.
"""

from __future__ import annotations

from pydantic import ValidationError


class ArchfarmError(Exception):
    """Base of every error archfarm raises on purpose; its message is one line meant for the user."""


class InvalidInput(ArchfarmError):
    """A job, profile, plan, name or URL the user gave is wrong; nothing has been stored or queued."""


class PlanError(InvalidInput):
    """A plan file is missing, unreadable, not an image, truncated or too large to decode safely."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"{url}: {problem}")
        self.url = url
        self.problem = problem


class NotFound(ArchfarmError):
    """No job (or sidecar, or task) by the name given."""


class Unauthenticated(ArchfarmError):
    """A request without a valid API token where one is required (401)."""


class Forbidden(ArchfarmError):
    """A valid token asking for what its holder may not do: another owner's job (403)."""


class QuotaSpent(ArchfarmError):
    """The job's owner has spent its GPU-seconds of the last 24 hours (`ARCHFARM_QUOTAS`): nothing was stored (429)."""


class ConfigError(ArchfarmError):
    """The farm's configuration or machine cannot do what was asked: fix the setup, not the job."""


class SchemaOutdated(ConfigError):
    """The server database is not at the schema this code expects: run `archfarm db upgrade`."""


class PermanentError(ArchfarmError):
    """A task cannot succeed by retrying (missing model, bad input discovered late): fail it now."""


class InputError(PermanentError):
    """A task's own input cannot be read or used: its plan or a control image missing from storage, unreadable
    or not an image, a model that will not load. Every node would meet the same, so the task fails at once and
    counts against no node, and the queued tasks sharing the input fail with it, with the same reason
    (`archfarm retry` renders them once the input is restored).

    `plan_digest` names the plan at fault (the tasks of that plan share the input); None when the input is the
    job's own (a model, a control image of the profile), shared by every task of the job."""

    def __init__(self, message: str, plan_digest: str | None = None) -> None:
        super().__init__(message)
        self.plan_digest = plan_digest


class ModelError(InputError):
    """A model reference names nothing that can be loaded."""


class TransientError(ArchfarmError):
    """A task may succeed if retried later: storage, database or broker unavailable for a moment."""


class StorageError(TransientError):
    """The storage backend failed for a reason other than a missing object."""


class DatabaseUnavailable(TransientError):
    """The state database did not answer."""


class BrokerUnavailable(TransientError):
    """The broker did not take a message; the tasks stay queued in the database and are sent later."""


class SubmitWarning(UserWarning):
    """Something about a stored job its submitter should know, though it will run: a model on the workers'
    disks that cannot be checked from here, a broker that refused the messages for now, a control map that is
    nearly empty."""


def one_line(error: BaseException) -> str:
    """The reason stored on a task's row or shown by a probe: archfarm's own message, or the type and first
    line of another."""
    text = str(error).strip()
    if isinstance(error, ValidationError):
        text = f"its stored job spec no longer validates ({error.error_count()} errors)"
    elif not isinstance(error, ArchfarmError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return (text.splitlines() or [type(error).__name__])[0]
