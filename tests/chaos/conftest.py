"""The chaos suite's services (its own PostgreSQL, brokers and S3 server, so they can be killed) and its
report: per scenario and broker, tasks lost, duplicated and stranded, and the time to recover."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.farm import HEADER, Outcome
from tests.chaos.modes import BROKERS
from tests.chaos.services import Broker, PrivatePostgres, PrivateRabbitMQ, PrivateRedis, PrivateS3
from tests.conftest import service_missing

OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="session")
def chaos_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivatePostgres, PrivateS3]]:
    folder = tmp_path_factory.mktemp("chaos-services")
    try:
        postgres = PrivatePostgres()
    except (FileNotFoundError, OSError) as error:
        service_missing(f"cannot run a private PostgreSQL for the chaos suite: {error}")
    s3 = PrivateS3(folder)
    yield postgres, s3
    s3.close()
    postgres.close()


@pytest.fixture(scope="session")
def chaos_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Broker]]:
    """The suite's brokers, each started the first time a scenario asks for it: `redis` (no persistence),
    `redis-aof` (appendonly, fsync every second) and `rabbitmq` (quorum queues)."""
    folder = tmp_path_factory.mktemp("chaos-brokers")
    started: dict[str, Broker] = {}

    def broker(kind: str) -> Broker:
        if kind not in started:
            try:
                started[kind] = (
                    PrivateRabbitMQ(folder) if kind == "rabbitmq" else PrivateRedis(folder, kind == "redis-aof")
                )
            except (FileNotFoundError, OSError, AssertionError) as error:
                service_missing(f"cannot run a private {kind} for the chaos suite: {error}")
        return started[kind]

    yield broker
    for running in started.values():
        running.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The scenarios grouped by broker, in place (every other test keeps its slot), so that each broker's
    surviving farm starts once."""
    order = {broker: rank for rank, broker in enumerate(BROKERS)}

    def broker(item: pytest.Item) -> str | None:
        callspec = getattr(item, "callspec", None)
        return None if callspec is None else callspec.params.get("broker")

    slots = [i for i, item in enumerate(items) if broker(item) is not None]
    grouped = sorted((items[i] for i in slots), key=lambda item: order.get(broker(item) or "", len(order)))
    for slot, item in zip(slots, grouped, strict=True):
        items[slot] = item


@pytest.fixture(scope="session")
def outcomes() -> list[Outcome]:
    return OUTCOMES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not OUTCOMES:
        return
    terminalreporter.section(f"chaos ({os.environ.get('ARCHFARM_CHAOS', 'short')} form)")
    terminalreporter.write_line(HEADER)
    for outcome in OUTCOMES:
        terminalreporter.write_line(outcome.row())
    report = os.environ.get("ARCHFARM_CHAOS_REPORT")
    if report:
        from tests.chaos.farm import dump

        Path(report).write_text(dump(OUTCOMES))
