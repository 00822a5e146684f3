"""The wire contract over a real Mosquitto: what one paho client publishes on a topic the schema
builds, another receives, parses and decodes to the same message. Also the broker behaviours the
design leans on (retained presence, last will, persistent sessions, persistence across restarts)
and the harness's own failure report."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from edgefleet.contract import (
    CHANNELS,
    ActiveModel,
    ArtifactChunk,
    Channel,
    LatencyStats,
    Presence,
    PresenceState,
    TelemetryBatch,
    Topic,
    TopicSchema,
    VariantKind,
    WireMessage,
    decode_topic,
    encode,
)
from tests.broker import (
    BrokerError,
    LoopbackClient,
    MessageCollector,
    MosquittoBroker,
    Received,
    Will,
    connect_client,
)

pytestmark = pytest.mark.broker

ClientFactory = Callable[..., LoopbackClient]
DEVICE = "pi-0001"
WAIT = 3.0


def _subscriber(connect: ClientFactory, broker: MosquittoBroker, topic_filter: str,
                **options: object) -> tuple[LoopbackClient, MessageCollector]:
    collector = MessageCollector()
    client = connect(broker.port, on_message=collector, **options)
    client.subscribe_and_wait(topic_filter, qos=1)
    return client, collector


def _received(schema: TopicSchema, message: Received) -> tuple[Topic, WireMessage]:
    topic = schema.parse(message.topic)
    return topic, decode_topic(topic, message.payload)


def _telemetry() -> TelemetryBatch:
    return TelemetryBatch(
        device_id=DEVICE, seq=42, window_start=1_700_000_000.0, window_end=1_700_000_060.0,
        model=ActiveModel(model_name="resnet18", model_version=3,
                          variant_kind=VariantKind.TFLITE_INT8, artifact_id="a-3-int8"),
        execution="litert/edgetpu", inferences=1800, errors=1, throughput_ips=30.0,
        latency=LatencyStats(p50_ms=8.1, p95_ms=11.4, p99_ms=14.0, max_ms=21.5),
        labelled=120, accuracy=0.91, cpu_percent=37.5, rss_mb=212.0, temperature_c=61.0)


def _presence(state: PresenceState) -> Presence:
    return Presence(device_id=DEVICE, state=state, ts=1_700_000_000.0, agent_version="0.1.0")


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311],
                         ids=["mqtt5", "mqtt311"])
def test_telemetry_published_qos1_arrives_parsed_and_decoded_unchanged(
        mosquitto: MosquittoBroker, mqtt_client_factory: ClientFactory,
        topic_schema: TopicSchema, protocol: MQTTProtocolVersion) -> None:
    _, inbox = _subscriber(mqtt_client_factory, mosquitto, topic_schema.filter(Channel.TELEMETRY),
                           protocol=protocol)
    device = mqtt_client_factory(mosquitto.port, protocol=protocol)
    sent = _telemetry()
    spec = CHANNELS[Channel.TELEMETRY]

    device.publish_and_wait(topic_schema.build(Channel.TELEMETRY, DEVICE), encode(sent),
                            qos=spec.qos, retain=spec.retain)

    [message] = inbox.wait_for(1, WAIT)
    assert message.qos == 1
    assert _received(topic_schema, message) == (Topic(Channel.TELEMETRY, DEVICE), sent)
    assert message.payload.startswith(b"{")          # the channel's encoding is JSON


def test_artifact_chunk_travels_as_messagepack_and_decodes_unchanged(
        mosquitto: MosquittoBroker, mqtt_client_factory: ClientFactory,
        topic_schema: TopicSchema) -> None:
    _, inbox = _subscriber(mqtt_client_factory, mosquitto,
                           topic_schema.filter(Channel.CHUNK, DEVICE))
    controller = mqtt_client_factory(mosquitto.port)
    sent = ArtifactChunk(artifact_id="a-3-int8", index=7, total=9, data=bytes(range(256)) * 64)

    controller.publish_and_wait(topic_schema.build(Channel.CHUNK, DEVICE), encode(sent),
                                qos=CHANNELS[Channel.CHUNK].qos)

    [message] = inbox.wait_for(1, WAIT)
    assert not message.payload.startswith(b"{")      # binary, not base64 in JSON
    assert len(message.payload) < len(sent.data) + 100
    assert _received(topic_schema, message) == (Topic(Channel.CHUNK, DEVICE), sent)


def test_retained_presence_reaches_a_controller_that_subscribes_later(
        mosquitto: MosquittoBroker, mqtt_client_factory: ClientFactory,
        topic_schema: TopicSchema) -> None:
    spec = CHANNELS[Channel.PRESENCE]
    assert spec.retain
    device = mqtt_client_factory(mosquitto.port)
    online = _presence(PresenceState.ONLINE)
    device.publish_and_wait(topic_schema.build(Channel.PRESENCE, DEVICE), encode(online),
                            qos=spec.qos, retain=spec.retain)

    _, inbox = _subscriber(mqtt_client_factory, mosquitto, topic_schema.filter(Channel.PRESENCE))

    [message] = inbox.wait_for(1, WAIT)
    assert message.retain
    assert _received(topic_schema, message) == (Topic(Channel.PRESENCE, DEVICE), online)


_CRASHING_DEVICE = textwrap.dedent("""
    import sys, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, topic, will = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="crashing-device",
                         protocol=mqtt.MQTTv5)
    client.will_set(topic, will, qos=1, retain=True)
    client.on_connect = lambda *args: print("connected", flush=True)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_forever()
""")


def test_last_will_marks_a_device_offline_when_its_process_dies(
        mosquitto: MosquittoBroker, mqtt_client_factory: ClientFactory,
        topic_schema: TopicSchema) -> None:
    topic = topic_schema.build(Channel.PRESENCE, DEVICE)
    offline = _presence(PresenceState.OFFLINE)
    _, inbox = _subscriber(mqtt_client_factory, mosquitto, topic_schema.filter(Channel.PRESENCE))
    device = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_DEVICE, str(mosquitto.port), topic,
         encode(offline).hex()], stdout=subprocess.PIPE, text=True)
    try:
        assert device.stdout is not None
        assert device.stdout.readline().strip() == "connected"
        inbox.expect_none(within=0.1)                # nothing while the device is alive

        os.kill(device.pid, signal.SIGKILL)          # no DISCONNECT: the socket just dies
        device.wait(WAIT)
    finally:
        device.kill()
        device.wait()
        if device.stdout is not None:
            device.stdout.close()

    [message] = inbox.wait_for(1, WAIT)
    assert _received(topic_schema, message) == (Topic(Channel.PRESENCE, DEVICE), offline)
    # The will is retained too: a controller that starts after the crash still sees it.
    _, late = _subscriber(mqtt_client_factory, mosquitto, topic_schema.filter(Channel.PRESENCE))
    [retained] = late.wait_for(1, WAIT)
    assert retained.retain and _received(topic_schema, retained)[1] == offline


def test_last_will_from_the_harness_client_is_published_on_abrupt_close(
        mosquitto: MosquittoBroker, mqtt_client_factory: ClientFactory,
        topic_schema: TopicSchema) -> None:
    topic = topic_schema.build(Channel.PRESENCE, DEVICE)
    offline = encode(_presence(PresenceState.OFFLINE))
    _, inbox = _subscriber(mqtt_client_factory, mosquitto, topic)
    device = mqtt_client_factory(mosquitto.port, will=Will(topic, offline, qos=1, retain=True))

    sock = device.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)                  # the connection drops, no DISCONNECT sent
    device.loop_stop()                               # and no reconnect either

    [message] = inbox.wait_for(1, WAIT)
    assert message.payload == offline


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311],
                         ids=["mqtt5", "mqtt311"])
def test_command_queued_while_device_offline_arrives_when_its_session_resumes(
        mosquitto: MosquittoBroker, mqtt_client_factory: ClientFactory,
        topic_schema: TopicSchema, protocol: MQTTProtocolVersion) -> None:
    # A chunk stands in for any QoS 1 message to the device; commands queue the same way.
    session = {"client_id": f"dev-{DEVICE}", "clean_start": False, "protocol": protocol}
    device, _ = _subscriber(mqtt_client_factory, mosquitto,
                            topic_schema.filter(Channel.CHUNK, DEVICE), **session)
    device.close()                                   # clean DISCONNECT, session kept
    controller = mqtt_client_factory(mosquitto.port)
    sent = ArtifactChunk(artifact_id="a-1", index=0, total=1, data=b"\x00\x01")
    controller.publish_and_wait(topic_schema.build(Channel.CHUNK, DEVICE), encode(sent), qos=1)

    inbox = MessageCollector()
    resumed = mqtt_client_factory(mosquitto.port, on_message=inbox, **session)

    assert resumed.connack.session_present
    [message] = inbox.wait_for(1, WAIT)
    assert message.qos == 1
    assert _received(topic_schema, message) == (Topic(Channel.CHUNK, DEVICE), sent)


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_retained_message_survives_a_broker_restart_with_persistence(
        mosquitto_factory: Callable[..., MosquittoBroker], mqtt_client_factory: ClientFactory,
        topic_schema: TopicSchema, end: str) -> None:
    broker = mosquitto_factory(persistence=True, autosave_interval=1).start()
    topic = topic_schema.build(Channel.PRESENCE, DEVICE)
    online = encode(_presence(PresenceState.ONLINE))
    device = mqtt_client_factory(broker.port)
    device.publish_and_wait(topic, online, qos=1, retain=True)
    device.close()
    port = broker.port

    if end == "stop":
        broker.restart()                             # SIGTERM saves the database on exit
    else:
        # A crash keeps only what an autosave wrote: wait until one has.
        db = broker.persistence_dir / "mosquitto.db"
        _wait_until(lambda: db.exists() and online in db.read_bytes(), WAIT)
        broker.kill()
        broker.start()

    assert broker.port == port
    _, inbox = _subscriber(mqtt_client_factory, broker, topic)
    [message] = inbox.wait_for(1, WAIT)
    assert message.retain and message.payload == online
    assert broker.log_text().count("mosquitto version") >= 2


def test_bad_config_fails_start_with_the_brokers_own_complaint(
        mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    broker = mosquitto_factory(extra_config=["no_such_option 1"])

    with pytest.raises(BrokerError) as failure:
        broker.start(timeout=WAIT)

    assert 'Unknown configuration variable "no_such_option"' in str(failure.value)
    assert not broker.running


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_first_start_moves_to_new_ports_when_its_port_was_taken_meanwhile(
        mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    broker = mosquitto_factory()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((broker.host, broker.port))
    squatter.listen()
    taken = broker.port
    try:
        broker.start()
    finally:
        squatter.close()
    assert broker.port != taken and broker.running
    assert f"listener {broker.port} " in broker.config_path.read_text()
    connect_client(broker.port).close()
