"""One exception tree for archfarm.

Callers branch on the *kind* of failure, never on message text: `InvalidInput` is the user's to fix and is
shown as one line; `PermanentError` fails a task at once; `TransientError` is retried with backoff.
"""

from __future__ import annotations


class ArchfarmError(Exception):
    """Base of every error archfarm raises on purpose."""


class InvalidInput(ArchfarmError):
    """A job, profile, plan, name or URL the user gave is wrong; nothing has been stored or queued."""


class PlanError(InvalidInput):
    """A plan file is missing, unreadable, not an image, truncated or too large to decode safely."""


class PermanentError(ArchfarmError):
    """A task cannot succeed by retrying (missing model, bad input discovered late): fail it now."""


class ModelError(PermanentError):
    """A model reference names nothing that can be loaded."""


class TransientError(ArchfarmError):
    """A task may succeed if retried later: storage, database or broker unavailable for a moment."""


class StorageError(TransientError):
    """The storage backend failed for a reason other than a missing object."""
