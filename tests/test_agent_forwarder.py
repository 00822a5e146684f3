"""agent.forwarder with a real AgentLink (agent.mqtt), a real SQLite Outbox and a real Mosquitto:
the outbox arrives in order, rows go only on PUBACK, the window of unacknowledged publishes is
never exceeded; and the link turns a bad payload on the command topic into a Malformed item."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import BrokerConfig
from agent.forwarder import Forwarder
from agent.mqtt import AgentLink, Inbound, Malformed, Outgoing
from agent.outbox import Outbox
from edgefleet.contract import Channel, CommandKind, RollbackCommand, TopicSchema, encode
from tests.broker import LoopbackClient, MessageCollector, MosquittoBroker

pytestmark = pytest.mark.broker


class CountingLink(AgentLink):
    """The real link, noting at each publish how many earlier ones the broker has not acked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.acked = 0
        self.most_unacked = 0
        super().__init__(*args, **kwargs)

    def publish(self, message: Outgoing) -> int | None:
        with self.lock:
            self.sent += 1
            self.most_unacked = max(self.most_unacked, self.sent - self.acked)
        return super().publish(message)

    def count_ack(self) -> None:
        with self.lock:
            self.acked += 1


@dataclass
class Device:
    device_id: str
    schema: TopicSchema
    outbox: Outbox
    link: CountingLink
    forwarder: Forwarder
    inbound: queue.Queue[Inbound | Malformed] = field(default_factory=queue.Queue)

    @property
    def telemetry_topic(self) -> str:
        return self.schema.build(Channel.TELEMETRY, self.device_id)

    def start(self) -> None:
        self.forwarder.start()
        self.link.start()
        assert self.link.wait_connected(10), "the agent's link did not connect"


DeviceFactory = Callable[..., Device]


@pytest.fixture
def device_factory(tmp_path: Path, mosquitto: MosquittoBroker,
                   topic_schema: TopicSchema) -> Iterator[DeviceFactory]:
    made: list[Device] = []

    def make(max_inflight: int = 200) -> Device:
        device_id = f"dev-{uuid.uuid4().hex[:8]}"
        outbox = Outbox(tmp_path / f"{device_id}.db")
        inbound: queue.Queue[Inbound | Malformed] = queue.Queue()
        link: CountingLink
        forwarder: Forwarder              # the link's callbacks reach it once it exists

        def published(mid: int) -> None:
            link.count_ack()
            forwarder.on_published(mid)

        link = CountingLink(
            device_id, BrokerConfig(host=mosquitto.host, port=mosquitto.port,
                                    topic_root=topic_schema.root, keepalive_s=5,
                                    reconnect_min_s=0.2, reconnect_max_s=1.0),
            on_inbound=inbound.put, on_connection=lambda up: forwarder.connection_changed(up),
            on_published=published,
            will=Outgoing(topic_schema.build(Channel.PRESENCE, device_id), b"gone", 1, True),
            birth=lambda: [])
        forwarder = Forwarder(outbox, link, max_inflight=max_inflight)
        device = Device(device_id, topic_schema, outbox, link, forwarder, inbound)
        made.append(device)
        return device

    yield make
    for device in made:
        device.forwarder.stop()
        device.forwarder.join(timeout=10)
        device.link.stop()
        device.outbox.close()


ClientFactory = Callable[..., LoopbackClient]


def subscribe(clients: ClientFactory, mosquitto: MosquittoBroker, topic: str) -> MessageCollector:
    collector = MessageCollector()
    clients(mosquitto.port, on_message=collector).subscribe_and_wait(topic, qos=1)
    return collector


def fill(device: Device, count: int, start: int = 0) -> None:
    with device.outbox.transaction():
        for n in range(start, start + count):
            device.outbox.append(device.telemetry_topic, f"m{n}".encode())


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def test_the_outbox_arrives_in_order_and_acknowledged_rows_are_deleted(
        device_factory: DeviceFactory, mosquitto: MosquittoBroker,
        mqtt_client_factory: ClientFactory) -> None:
    device = device_factory()
    collector = subscribe(mqtt_client_factory, mosquitto, device.telemetry_topic)
    fill(device, 20)                     # stored while offline

    device.start()
    fill(device, 30, start=20)           # stored while online
    device.forwarder.wake()

    received = collector.wait_for(50, timeout=20)
    assert [m.payload for m in received] == [f"m{n}".encode() for n in range(50)]
    assert all(m.qos == 1 and not m.retain for m in received)
    wait_until(lambda: len(device.outbox) == 0, what="the outbox to empty")
    assert device.forwarder.acked == 50 and device.forwarder.inflight == 0
    assert device.outbox.pending(limit=10) == []
    collector.expect_none()


def test_at_most_max_inflight_publishes_are_unacknowledged_and_all_arrive(
        device_factory: DeviceFactory, mosquitto: MosquittoBroker,
        mqtt_client_factory: ClientFactory) -> None:
    device = device_factory(max_inflight=5)
    collector = subscribe(mqtt_client_factory, mosquitto, device.telemetry_topic)
    fill(device, 500)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(device.forwarder.inflight)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        device.start()
        received = collector.wait_for(500, timeout=60)
        wait_until(lambda: len(device.outbox) == 0, what="the outbox to empty")
    finally:
        done.set()
        sampler.join()

    assert [m.payload for m in received] == [f"m{n}".encode() for n in range(500)]
    assert max(samples) <= 5
    assert max(samples) > 1                     # the window was used, not one at a time
    assert device.link.most_unacked <= 5        # counted at the link, PUBACK by PUBACK
    assert device.link.sent == device.forwarder.published == 500
    assert device.forwarder.acked == 500


def test_rows_stay_in_the_outbox_until_the_broker_acknowledges_them(
        device_factory: DeviceFactory, mosquitto: MosquittoBroker) -> None:
    device = device_factory(max_inflight=10)
    device.start()
    mosquitto.kill()                            # the link notices; nothing can be acked
    wait_until(lambda: not device.link.connected, what="the link to notice")
    fill(device, 5)
    device.forwarder.wake()
    time.sleep(0.5)

    assert len(device.outbox) == 5 and device.forwarder.acked == 0

    mosquitto.start()
    wait_until(lambda: device.link.connected, what="the link to reconnect")
    device.forwarder.wake()
    wait_until(lambda: len(device.outbox) == 0, what="the outbox to empty")
    assert device.forwarder.acked == 5


def command_topic(device: Device, kind: CommandKind = CommandKind.DEPLOY) -> str:
    return device.schema.command(device.device_id, kind)


MALFORMED = [
    pytest.param(b"not json at all", None, id="not-json"),
    pytest.param(b'{"type": "deploy", "v": 1, "command_id": "cmd-7"}', "cmd-7",
                 id="deploy-missing-fields"),
    pytest.param(b'{"type": "deploy", "command_id": "cmd-8", "ts": "yesterday", '
                 b'"manifest": {}}', "cmd-8", id="deploy-wrong-type"),
    pytest.param(b'["a", "list"]', None, id="json-not-an-object"),
    pytest.param(b'{"type": "deploy", "command_id": 17}', None, id="command-id-not-a-string"),
    pytest.param(b'{"type": "deploy", "command_id": "' + b"x" * 200 + b'"}', None,
                 id="command-id-too-long"),
]


@pytest.mark.parametrize(("payload", "command_id"), MALFORMED)
def test_a_malformed_command_becomes_a_malformed_item_with_the_reason_and_command_id(
        device_factory: DeviceFactory, mosquitto: MosquittoBroker,
        mqtt_client_factory: ClientFactory, payload: bytes, command_id: str | None) -> None:
    device = device_factory()
    device.start()

    mqtt_client_factory(mosquitto.port).publish_and_wait(command_topic(device), payload, qos=1)
    item = device.inbound.get(timeout=10)

    assert isinstance(item, Malformed)
    assert item.topic == command_topic(device)
    assert item.command_id == command_id
    assert item.reason                                  # says what is wrong
    assert device.link.connected                        # and the link carries on


def test_a_command_of_another_kind_on_the_deploy_topic_is_malformed_and_a_good_one_is_not(
        device_factory: DeviceFactory, mosquitto: MosquittoBroker,
        mqtt_client_factory: ClientFactory) -> None:
    device = device_factory()
    device.start()
    rollback = RollbackCommand(command_id="cmd-9", ts=1.0, reason="operator")
    controller = mqtt_client_factory(mosquitto.port)

    controller.publish_and_wait(command_topic(device), encode(rollback), qos=1)
    controller.publish_and_wait(command_topic(device, CommandKind.ROLLBACK), encode(rollback),
                                qos=1)
    wrong_topic = device.inbound.get(timeout=10)
    right_topic = device.inbound.get(timeout=10)

    assert isinstance(wrong_topic, Malformed) and wrong_topic.command_id == "cmd-9"
    assert isinstance(right_topic, Inbound) and right_topic.message == rollback


@pytest.mark.slow
def test_a_report_for_the_links_own_publish_never_acknowledges_a_forwarded_message(
        device_factory: DeviceFactory, mosquitto: MosquittoBroker) -> None:
    device = device_factory()
    device.start()
    heartbeat = Outgoing(device.schema.build(Channel.HEARTBEAT, device.device_id), b"hb", 0,
                         False)
    # The link's own publishes (heartbeats: QoS 0, reported once sent; chunk requests) come
    # back through the same callback as the forwarder's PUBACKs. Enough of them use up every
    # one of paho's 16-bit message ids, so the forwarder's next publish reuses the id of one
    # that was reported long ago.
    for _ in range(65_535):
        assert device.link.publish(heartbeat) is not None
    wait_until(lambda: device.link.acked >= 65_535, timeout=120, what="65,535 reports")

    assert mosquitto.pid is not None
    os.kill(mosquitto.pid, signal.SIGSTOP)      # the broker takes the message but cannot ack
    try:
        fill(device, 1)
        device.forwarder.wake()
        wait_until(lambda: device.forwarder.published == 1, what="the publish")
        time.sleep(0.3)
        assert len(device.outbox) == 1 and device.forwarder.acked == 0
    finally:
        os.kill(mosquitto.pid, signal.SIGCONT)
    wait_until(lambda: len(device.outbox) == 0, what="the real PUBACK")
