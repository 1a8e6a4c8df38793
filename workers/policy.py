"""The failure policy: what happens to a task that did not complete, decided in one pure function.

`decide(kind, history, limits)` is the farm's whole rulebook; the lifecycle records the attempt, reads the
task's history and applies the decision. The rules:

- cancelled: the task stays cancelled;
- permanent (bad input found late, an input that cannot be read, a model that cannot be loaded, a stored
  spec that no longer parses): fail now with the reason, counted against no node;
- transient (storage, database or broker away): back to the queue after an exponential backoff, until
  transient errors have gone on for longer than the budget (a time, so an outage of any number of attempts
  is ridden out while it lasts less);
- error (anything else the task raised): retried at once on another worker; fails after raising on
  `error_nodes` different nodes or `error_attempts` times in all. These, and only these, may blocklist the
  node for the job, once other nodes render the plans it fails on (`shared.db.store.blocklisted_nodes`);
- crash (the process running the task died: killed from outside, or by the task): retried; fails once the
  task has died with `crash_nodes` different nodes or `crash_attempts` times, so a task that kills every
  process it runs in ends, while a kill from outside costs nothing but the render;
- blocked (this node is blocklisted for the job): handed back for another node after a short delay, or
  failed, with the error that blocklisted the node, when no live node may take it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shared.config import Settings
from shared.db.models import FailureKind

IN_PROCESS_TRANSIENT_S = 120.0


class ErrorKind(str, enum.Enum):
    CANCELLED = "cancelled"
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    ERROR = "error"
    CRASH = "crash"
    BLOCKED = "blocked"


COUNTED = {
    ErrorKind.TRANSIENT: FailureKind.TRANSIENT,
    ErrorKind.ERROR: FailureKind.ERROR,
    ErrorKind.CRASH: FailureKind.CRASH,
}
"""Kinds recorded as failed attempts in `task_failures` (and so in a task's history), as what they are stored as."""


class Action(str, enum.Enum):
    FAIL = "fail"
    RETRY = "retry"  # back to the queue after `delay`, the attempt counted
    HAND_BACK = "hand_back"  # back to the queue after `delay`, nothing held against anyone
    CANCEL = "cancel"


_DEFAULTS = Settings.model_fields


@dataclass(frozen=True)
class Limits:
    """The policy's knobs: `Limits.farm(settings)` a farm worker's, `Limits.in_process(settings)` the embedded
    runner's; the defaults are the settings' defaults."""

    error_nodes: int = _DEFAULTS["error_nodes"].default
    error_attempts: int = _DEFAULTS["error_attempts"].default
    crash_nodes: int = _DEFAULTS["crash_nodes"].default
    crash_attempts: int = _DEFAULTS["crash_attempts"].default
    blocklist_after: int | None = _DEFAULTS["blocklist_after"].default
    """A node that failed this many tasks of a job whose plans others render stops taking them (None: no
    blocklist)."""
    transient_budget_s: float = _DEFAULTS["transient_budget"].default
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    hand_on_delay_s: float = 5.0
    upload_patience_s: float = 60.0
    """How long a finished render's upload is retried in place before its task goes back to the queue: a
    storage outage then stalls each worker on one task instead of burning through the queue, and the
    farm resumes within seconds of storage coming back."""

    @classmethod
    def farm(cls, settings: Settings) -> Limits:
        """A farm worker's, from the settings every process reads (`archfarm status` shows what they give)."""
        return cls(
            error_nodes=settings.error_nodes,
            error_attempts=settings.error_attempts,
            crash_nodes=settings.crash_nodes,
            crash_attempts=settings.crash_attempts,
            blocklist_after=settings.blocklist_after or None,
            transient_budget_s=settings.transient_budget,
        )

    @classmethod
    def in_process(cls, settings: Settings) -> Limits:
        """One process is the whole farm: an error would only repeat, and there is no other node to prefer;
        someone is usually watching, so transient errors get two minutes at most."""
        return cls(
            error_nodes=1,
            error_attempts=1,
            blocklist_after=None,
            transient_budget_s=min(settings.transient_budget, IN_PROCESS_TRANSIENT_S),
        )


@dataclass(frozen=True)
class History:
    """A task's failed attempts so far, this one included (from `task_failures`)."""

    errors: int = 0
    error_nodes: int = 0
    crashes: int = 0
    crash_nodes: int = 0
    transients: int = 0
    transient_s: float = 0.0
    """Seconds since the first transient failure of the current run of them."""
    open_nodes: int = 0
    """Live nodes, other than this one, not blocklisted for the task's job (for `BLOCKED` only)."""


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0
    reason: str = ""


def decide(kind: ErrorKind, history: History, limits: Limits, message: str = "") -> Decision:
    """What to do with a task whose attempt ended with an error of `kind` (`message` says what it was)."""
    if kind is ErrorKind.CANCELLED:
        return Decision(Action.CANCEL)
    if kind is ErrorKind.PERMANENT:
        return Decision(Action.FAIL, reason=message)
    if kind is ErrorKind.BLOCKED:
        if history.open_nodes == 0:
            cause = f"; the error that blocklisted this one: {message}" if message else ""
            return Decision(Action.FAIL, reason=f"every live worker is blocklisted for this job{cause}")
        return Decision(Action.HAND_BACK, delay=limits.hand_on_delay_s)
    if kind is ErrorKind.TRANSIENT:
        if history.transient_s >= limits.transient_budget_s:
            return Decision(
                Action.FAIL,
                reason=f"gave up after {history.transient_s:.0f} s of transient errors "
                f"({history.transients} attempts), last: {message}",
            )
        delay = min(limits.backoff_s * 2 ** max(history.transients - 1, 0), limits.backoff_max_s)
        return Decision(Action.RETRY, delay=delay)
    if kind is ErrorKind.CRASH:
        if history.crash_nodes >= limits.crash_nodes or history.crashes >= limits.crash_attempts:
            return Decision(
                Action.FAIL,
                reason=f"its worker process died {history.crashes} times on {history.crash_nodes} workers",
            )
        return Decision(Action.RETRY)
    if history.error_nodes >= limits.error_nodes or history.errors >= limits.error_attempts:
        if limits.error_attempts == 1:
            return Decision(Action.FAIL, reason=message)
        return Decision(
            Action.FAIL, reason=f"failed {history.errors} times on {history.error_nodes} workers, last: {message}"
        )
    return Decision(Action.RETRY)
