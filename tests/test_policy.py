"""The failure policy as a table: (error kind, history, limits) → decision. Pure, so every rule is a row."""

from __future__ import annotations

import pytest

from shared.config import Settings
from workers.policy import Action, ErrorKind, History, Limits, decide

FARM = Limits(transient_budget_s=900)
ALONE = Limits.in_process(Settings(transient_budget=120))

K = ErrorKind
A = Action

TABLE = [
    # kind, history, limits, action, delay, reason starts with
    (K.CANCELLED, History(), FARM, A.CANCEL, 0, ""),
    (K.PERMANENT, History(), FARM, A.FAIL, 0, "boom"),
    # transient: backoff doubles from 2 s to a 60 s cap, then a time budget, not a count, ends it
    (K.TRANSIENT, History(transients=1, transient_s=0), FARM, A.RETRY, 2, ""),
    (K.TRANSIENT, History(transients=2, transient_s=3), FARM, A.RETRY, 4, ""),
    (K.TRANSIENT, History(transients=5, transient_s=40), FARM, A.RETRY, 32, ""),
    (K.TRANSIENT, History(transients=40, transient_s=600), FARM, A.RETRY, 60, ""),
    (K.TRANSIENT, History(transients=3, transient_s=900), FARM, A.FAIL, 0, "gave up after 900 s of transient"),
    (K.TRANSIENT, History(transients=200, transient_s=899), FARM, A.RETRY, 60, ""),
    # errors: another node at once; three nodes or five attempts end it
    (K.ERROR, History(errors=1, error_nodes=1), FARM, A.RETRY, 0, ""),
    (K.ERROR, History(errors=2, error_nodes=2), FARM, A.RETRY, 0, ""),
    (K.ERROR, History(errors=3, error_nodes=3), FARM, A.FAIL, 0, "failed 3 times on 3 workers, last: boom"),
    (K.ERROR, History(errors=5, error_nodes=1), FARM, A.FAIL, 0, "failed 5 times on 1 workers"),
    (K.ERROR, History(errors=4, error_nodes=2, crashes=9), FARM, A.RETRY, 0, ""),
    # crashes: counted apart from errors; three nodes or five deaths end it
    (K.CRASH, History(crashes=1, crash_nodes=1), FARM, A.RETRY, 0, ""),
    (K.CRASH, History(crashes=2, crash_nodes=2, errors=2, error_nodes=2), FARM, A.RETRY, 0, ""),
    (K.CRASH, History(crashes=3, crash_nodes=3), FARM, A.FAIL, 0, "its worker process died 3 times on 3"),
    (K.CRASH, History(crashes=5, crash_nodes=1), FARM, A.FAIL, 0, "its worker process died 5 times on 1"),
    # blocked: handed on while another node may take it, failed when none can
    (K.BLOCKED, History(open_nodes=2), FARM, A.HAND_BACK, 5, ""),
    (K.BLOCKED, History(open_nodes=0), FARM, A.FAIL, 0, "every live worker is blocklisted for this job"),
    # in-process: one node is the whole farm, so an error is final and shows as it was raised
    (K.ERROR, History(errors=1, error_nodes=1), ALONE, A.FAIL, 0, "boom"),
    (K.TRANSIENT, History(transients=1, transient_s=119), ALONE, A.RETRY, 2, ""),
    (K.TRANSIENT, History(transients=7, transient_s=120), ALONE, A.FAIL, 0, "gave up after 120 s"),
]


@pytest.mark.parametrize(("kind", "history", "limits", "action", "delay", "reason"), TABLE)
def test_decision_table(
    kind: ErrorKind, history: History, limits: Limits, action: Action, delay: float, reason: str
) -> None:
    decision = decide(kind, history, limits, "boom")
    assert (decision.action, decision.delay) == (action, delay)
    assert decision.reason.startswith(reason)
    assert bool(decision.reason) == (action is Action.FAIL)


def test_in_process_limits_keep_the_farm_budget_when_it_is_shorter() -> None:
    assert Limits.in_process(Settings(transient_budget=30)).transient_budget_s == 30
    assert Limits.in_process(Settings(transient_budget=900)).transient_budget_s == 120


def test_a_farms_limits_are_its_settings() -> None:
    """Every process reads the same limits (workers decide by them, `status` counts blocklists by them)."""
    limits = Limits.farm(Settings(error_nodes=2, crash_attempts=9, blocklist_after=0, transient_budget=60))
    assert (limits.error_nodes, limits.crash_attempts, limits.blocklist_after, limits.transient_budget_s) == (
        2,
        9,
        None,
        60,
    )
    assert Limits() == Limits.farm(Settings())
