"""The controller's MQTT adapter and chunk server against a real Mosquitto."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from controller.distribution import MAX_WINDOW, ArtifactCache, ChunkServer
from controller.mqtt import BrokerSettings, BrokerUnavailable, ControllerLink
from edgefleet.contract import (
    ArtifactChunk,
    Channel,
    ChunkRequest,
    Heartbeat,
    TopicSchema,
    decode,
    encode,
)
from tests.broker import MessageCollector, MosquittoBroker, connect_client, free_ports


def _link(broker: MosquittoBroker, schema: TopicSchema, **kw: object) -> ControllerLink:
    link = ControllerLink(BrokerSettings(port=broker.port, topic_root=schema.root,
                                         client_id=f"ctl-{schema.root[:8]}", **kw))  # type: ignore[arg-type]
    link.start()
    return link


def test_device_traffic_arrives_on_the_inbound_queue(mosquitto: MosquittoBroker,
                                                     topic_schema: TopicSchema) -> None:
    link = _link(mosquitto, topic_schema)
    device = connect_client(mosquitto.port)
    try:
        for i in range(20):
            beat = Heartbeat(device_id="pi-1", ts=float(i), uptime_s=float(i))
            device.publish_and_wait(topic_schema.build(Channel.HEARTBEAT, "pi-1"), encode(beat))
        got = [link.inbound.get(timeout=5) for _ in range(20)]
        assert [decode(Heartbeat, g.payload).ts for g in got] == [float(i) for i in range(20)]
    finally:
        device.close()
        link.stop()


def test_publishes_stay_within_the_inflight_window_and_all_arrive(
        mosquitto: MosquittoBroker, topic_schema: TopicSchema) -> None:
    link = _link(mosquitto, topic_schema, max_inflight=4)
    collector = MessageCollector()
    device = connect_client(mosquitto.port, on_message=collector)
    device.subscribe_and_wait(f"{topic_schema.root}/#")
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, len(link._pending))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for i in range(300):
            assert link.publish(f"{topic_schema.root}/dev/pi-1/cmd/config", str(i).encode())
        got = collector.wait_for(300, timeout=20)
        assert [int(m.payload) for m in got] == list(range(300))
    finally:
        done.set()
        sampler.join()
        device.close()
        link.stop()
    assert peak <= 4


def test_an_unreachable_broker_is_one_clear_error() -> None:
    (port,) = free_ports(1)
    link = ControllerLink(BrokerSettings(port=port))
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
        link.start(timeout=2)


def test_the_chunk_server_clamps_windows_and_refuses_unknown_artifacts(
        mosquitto: MosquittoBroker, topic_schema: TopicSchema, tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    data = bytes(range(256)) * 400                     # 102,400 bytes
    artifact.write_bytes(data)
    link = _link(mosquitto, topic_schema)
    collector = MessageCollector()
    device = connect_client(mosquitto.port, on_message=collector)
    device.subscribe_and_wait(topic_schema.build(Channel.CHUNK, "pi-1"))
    server = ChunkServer(topic_schema, link,
                         ArtifactCache(lambda a: artifact if a == "a1" else None),
                         lambda a: 1024 if a == "a1" else None)
    try:
        sent = server.serve(ChunkRequest(device_id="pi-1", artifact_id="a1", first=0,
                                         count=1000))
        assert sent == MAX_WINDOW
        chunks = [decode(ArtifactChunk, m.payload) for m in collector.wait_for(MAX_WINDOW)]
        assert [c.index for c in chunks] == list(range(MAX_WINDOW))
        assert all(c.total == 100 for c in chunks)
        assert b"".join(c.data for c in chunks) == data[:MAX_WINDOW * 1024]
        # the rest, window by window, reassembles the exact file
        received = {c.index: c.data for c in chunks}
        first = MAX_WINDOW
        while first < 100:
            n = server.serve(ChunkRequest(device_id="pi-1", artifact_id="a1", first=first,
                                          count=MAX_WINDOW))
            for m in collector.wait_for(len(received) + n)[len(received):]:
                chunk = decode(ArtifactChunk, m.payload)
                received[chunk.index] = chunk.data
            first += n
        whole = b"".join(received[i] for i in range(100))
        assert hashlib.sha256(whole).digest() == hashlib.sha256(data).digest()
        assert server.serve(ChunkRequest(device_id="pi-1", artifact_id="nope", first=0,
                                         count=1)) == 0
        assert server.refused == 1
    finally:
        device.close()
        link.stop()


def test_messages_not_yet_acknowledged_are_redelivered_after_a_controller_dies(
        mosquitto: MosquittoBroker, topic_schema: TopicSchema) -> None:
    settings = BrokerSettings(port=mosquitto.port, topic_root=topic_schema.root,
                              client_id=f"ctl-ack-{topic_schema.root[:8]}")
    first = ControllerLink(settings)
    first.start()
    device = connect_client(mosquitto.port)
    try:
        for i in range(30):
            beat = Heartbeat(device_id="pi-1", ts=float(i), uptime_s=float(i))
            device.publish_and_wait(topic_schema.build(Channel.TELEMETRY, "pi-1"), encode(beat))
        received = [first.inbound.get(timeout=5) for _ in range(30)]
        first.ack(received[:10])                      # "stored" the first ten only
        time.sleep(0.3)
        first._client._sock_close()                   # dies without a DISCONNECT
        first._client.loop_stop()
        second = ControllerLink(settings)
        second.start()
        again = [second.inbound.get(timeout=10) for _ in range(20)]
        assert sorted(decode(Heartbeat, r.payload).ts for r in again) == [
            float(i) for i in range(10, 30)]
        second.ack(again)
        second.stop()
    finally:
        device.close()
