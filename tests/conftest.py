"""Shared fixtures: real Mosquitto brokers, paho clients that are closed after each test, and a
topic root of its own for every test so no two tests ever see each other's messages."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.contract import TopicSchema
from tests.broker import LoopbackClient, MosquittoBroker, connect_client, find_mosquitto

# The agent's end-to-end fixtures (a real agent process beside a real broker).
pytest_plugins = ["tests.agent_fleet", "tests.db_fixtures", "tests.controlled_fleet",
                  "tests.secure_fleet", "tests.cli_fleet"]

MosquittoFactory = Callable[..., MosquittoBroker]
ClientFactory = Callable[..., LoopbackClient]


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Makes `MosquittoBroker`s (not started) in tmp_path; all are stopped after the test.

    Takes `MosquittoBroker`'s keyword arguments: ``mosquitto_factory(persistence=True)``.
    """
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed (looked on PATH and in /usr/sbin): run .ci/run, "
                    "which installs it with apt-get and then runs the tests", pytrace=False)
    brokers: list[MosquittoBroker] = []

    def make(**options: Any) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(brokers)}", **options)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> MosquittoBroker:
    """One started broker: anonymous access, no persistence, on 127.0.0.1."""
    return mosquitto_factory().start()


@pytest.fixture
def mqtt_client_factory() -> Iterator[ClientFactory]:
    """Connects `LoopbackClient`s (`broker.connect_client` arguments); closes them afterwards."""
    clients: list[LoopbackClient] = []

    def make(port: int, **options: Any) -> LoopbackClient:
        client = connect_client(port, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def topic_schema() -> TopicSchema:
    """A schema under a root no other test uses, so retained messages never leak across."""
    return TopicSchema(f"t{uuid.uuid4().hex[:10]}/edgefleet")
