"""A storm of generated payloads on every topic the agent and the controller subscribe to
(issue 8), against Mosquitto running the configuration `edgefleet broker-config` wrote, a real
agent process enrolled from its bundle, and `edgefleet serve`: afterwards both processes are
alive, nothing crashed, the malformed messages were logged as such, the agent still reports
telemetry and the controller still stores it.

Topics come from the schema's own subscription lists, with a command kind no agent knows on
``cmd/+`` and a few device ids the schema refuses on ``dev/+``. Payloads are hypothesis examples
(tests/fuzz_payloads.py, fixed seeds): per topic 790, weighted towards the topic's own message
type with fields changed, plus random bytes, JSON and MessagePack, golden messages with a byte
changed, messages meant for another channel, long strings and deep nesting; every eighth one
retained on the retained channels (cleared afterwards). With today's schema: 7 agent topics
(cmd/deploy, rollback, shadow, config, an unknown kind, artifact/chunk, fleet/keys) and 6
controller topics (presence, facts, heartbeat, telemetry, status, artifact/request), 13 x 790 =
10,270 payloads in all (printed per topic).

Each payload goes in with the identity that may publish there: the agent-bound ones as a
controller (a second controller certificate, so serve keeps its own session), the
controller-bound ones as the enrolled device `fuzz-0`. Topics with device ids the schema refuses
are not stormed here: the ACL refuses them at the broker (tests/test_security_acl.py), and
TopicSchema.parse gets them in tests/test_fuzz_decoders.py.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest
import tomllib
from hypothesis import strategies as st
from paho.mqtt.reasoncodes import ReasonCode

from controller.broker_config import BrokerLimits
from edgefleet.contract import (
    CHANNEL_TYPES,
    CHANNELS,
    Channel,
    CommandKind,
    ConfigCommand,
    TelemetryBatch,
    TopicSchema,
    WireMessage,
    decode,
    encode,
)
from tests import fuzz_payloads as fp
from tests.controlled_fleet import ControlledFleet
from tests.secure_fleet import SecureFleet
from tests.variants_helpers import DATA, SOURCE

pytestmark = [pytest.mark.broker, pytest.mark.slow]

TARGET = "x86-64-0"          # the agent whose topics get the storm (a fixture device)
FUZZ_DEVICE = "fuzz-0"       # the device the controller-bound payloads claim to come from
PER_TOPIC = 790
UNKNOWN_KIND = "reboot"
RETAIN_EVERY = 8
TAG_OF = {t: str(t.__struct_config__.tag) for t in CHANNEL_TYPES.values()}
COMMAND_TAGS = tuple(k.value for k in CommandKind)


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = False


def publish_storm(client: mqtt.Client, messages: Iterable[Publish], *, window: int = 20,
                  timeout: float = 60.0) -> int:
    """Publishes every message at QoS 1 with at most `window` awaiting their PUBACK, so paho
    never holds (or drops) a backlog; returns how many the broker acknowledged. Fails on a
    publish paho refuses, a PUBACK with a failure reason, or one that never comes."""
    room = threading.Semaphore(window)
    refused: list[str] = []
    acked = 0

    def on_publish(client: mqtt.Client, userdata: object, mid: int,
                   reason: ReasonCode, properties: object) -> None:
        nonlocal acked
        if reason.is_failure:
            refused.append(f"mid {mid}: {reason}")
        acked += 1
        room.release()

    previous = client.on_publish
    client.on_publish = on_publish
    sent = 0
    try:
        for message in messages:
            if not room.acquire(timeout=timeout):
                raise AssertionError(f"no PUBACK for {timeout}s after {sent} publishes")
            info = client.publish(message.topic, message.payload, qos=1, retain=message.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise AssertionError(f"paho refused to publish on {message.topic!r}: "
                                     f"{mqtt.error_string(info.rc)}")
            sent += 1
        for _ in range(window):                      # the last ones' PUBACKs
            if not room.acquire(timeout=timeout):
                raise AssertionError(f"{sent - acked} publishes never acknowledged")
    finally:
        client.on_publish = previous
    assert not refused, f"the broker refused {len(refused)} publishes: {refused[:5]}"
    return acked


# --- the fleet and the storm ---------------------------------------------------------------------

@pytest.fixture
def storm_fleet(secure_fleet: SecureFleet) -> SecureFleet:
    """serve, and the agent under the storm, enrolled, registered with its profile."""
    secure_fleet.start_agent(TARGET, fakeroot="x86-64")
    secure_fleet.wait(lambda: bool(secure_fleet.query(
        "SELECT 1 FROM devices WHERE id = :d AND profile IS NOT NULL", d=TARGET)), 30,
        f"{TARGET} registered")
    return secure_fleet


@pytest.fixture
def storm_client(storm_fleet: SecureFleet) -> Iterator[mqtt.Client]:
    """Publishes what a controller may: the agent's commands, chunks and the key chain."""
    client = storm_fleet.as_tester()
    yield client
    client.close()


@pytest.fixture
def device_client(storm_fleet: SecureFleet) -> Iterator[mqtt.Client]:
    """Publishes what the device `fuzz-0` may: its own presence, facts, telemetry..."""
    client = storm_fleet.as_device(FUZZ_DEVICE)
    yield client
    client.close()


def _schema(fleet: ControlledFleet) -> TopicSchema:
    config = tomllib.loads(fleet.agents[TARGET].config.read_text())
    return TopicSchema(config["broker"]["topic_root"])


def _concrete(topic_filter: str, device_id: str) -> str:
    return topic_filter.replace("/+/", f"/{device_id}/")


def storm_topics(schema: TopicSchema) -> dict[str, st.SearchStrategy[bytes]]:
    """Every topic either side subscribes to, each with payloads aimed at it."""
    topics: dict[str, st.SearchStrategy[bytes]] = {}
    for topic_filter, _ in schema.agent_subscriptions(TARGET):
        if topic_filter.endswith("/+"):
            for kind in (*COMMAND_TAGS, UNKNOWN_KIND):
                tags = [kind] if kind in COMMAND_TAGS else fp.TAGS
                topics[topic_filter[:-1] + kind] = _aimed(tags)
        elif topic_filter == schema.build(Channel.CHUNK, TARGET):
            topics[topic_filter] = fp.msgpack_chunks() | _aimed(["chunk"])
        else:
            topics[topic_filter] = _aimed(fp.TAGS)
    for topic_filter, _ in schema.controller_subscriptions():
        channel = schema.parse(_concrete(topic_filter, FUZZ_DEVICE)).channel
        topics[_concrete(topic_filter, FUZZ_DEVICE)] = _aimed(
            [TAG_OF[CHANNEL_TYPES[channel]]], FUZZ_DEVICE)
    return topics


def _aimed(tags: list[str] | tuple[str, ...], device_id: str | None = None,
           ) -> st.SearchStrategy[bytes]:
    return fp.payloads(tags, device_id, longest=20_000) | fp.deeply_nested(tags)


def build_storm(schema: TopicSchema) -> tuple[list[Publish], Counter[str]]:
    """The storm, interleaved across topics, and how many payloads each topic gets."""
    per_topic: dict[str, list[Publish]] = {}
    for seed, (topic, strategy) in enumerate(sorted(storm_topics(schema).items())):
        retained = _retained(schema, topic)
        per_topic[topic] = [Publish(topic, payload, retained and i % RETAIN_EVERY == 0)
                            for i, payload in enumerate(fp.draw_examples(strategy, PER_TOPIC,
                                                                         seed=seed))]
    storm = [p for batch in _round_robin(list(per_topic.values())) for p in batch]
    return storm, Counter({topic: len(batch) for topic, batch in per_topic.items()})


def _round_robin(batches: list[list[Publish]]) -> Iterator[list[Publish]]:
    for i in range(max(len(b) for b in batches)):
        yield [b[i] for b in batches if i < len(b)]


def _retained(schema: TopicSchema, topic: str) -> bool:
    try:
        parsed = schema.parse(topic)
    except ValueError:
        return False     # the key chain: retained by the controller, whose copy we keep
    return parsed.device_id == FUZZ_DEVICE and CHANNELS[parsed.channel].retain


def _rejected_by_decoding(schema: TopicSchema, storm: list[Publish]) -> int:
    """How many controller-bound payloads of the fuzz device do not even decode: each must be
    logged as rejected (more are, for the device id or an unstorable value)."""
    count = 0
    for message in storm:
        if not message.topic.startswith(f"{schema.devices_prefix}{FUZZ_DEVICE}/"):
            continue
        message_type: type[WireMessage] = CHANNEL_TYPES[schema.parse(message.topic).channel]
        try:
            decode(message_type, message.payload)
        except Exception:
            count += 1
    return count


# --- what the logs and the database say ----------------------------------------------------------

def _controller_rejections(log: str) -> int:
    return len(re.findall(rf"(?m)(?:rejected \w+|bad chunk request) from {FUZZ_DEVICE}: ", log))


def _first_traceback(text: str) -> str | None:
    at = text.find("Traceback")
    return None if at < 0 else text[max(0, at - 300):at + 3000]


def _watch(client: mqtt.Client, topic: str) -> queue.Queue[bytes]:
    """Payloads published on `topic` from now on (plain paho calls: any client will do)."""
    received: queue.Queue[bytes] = queue.Queue()
    client.message_callback_add(topic, lambda c, u, m: received.put(bytes(m.payload)))
    client.subscribe(topic, qos=0)
    return received


def _drain(received: queue.Queue[bytes]) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            received.get_nowait()


def _unless_crashed(fleet: ControlledFleet, predicate: Callable[[], bool],
                    ) -> Callable[[], bool]:
    """`predicate` for `fleet.wait`, failing at once when the controller or the agent under
    the storm logs a traceback (a thread died, or a batch is retried for ever)."""
    def check() -> bool:
        for name, text in (("edgefleet serve", fleet.serve_log()),
                           (TARGET, fleet.agents[TARGET].log_text())):
            trace = _first_traceback(text)
            if trace is not None:
                raise AssertionError(f"{name} logged a traceback during the storm:\n{trace}")
        return predicate()
    return check


def _newest_seq(fleet: ControlledFleet, device_id: str) -> int:
    rows = fleet.query("SELECT MAX(seq) AS seq FROM telemetry WHERE device_id = :d", d=device_id)
    return int(rows[0]["seq"] or 0)


def test_a_storm_of_generated_payloads_on_every_subscribed_topic_leaves_both_serving(
        storm_fleet: SecureFleet, storm_client: mqtt.Client, device_client: mqtt.Client
        ) -> None:
    fleet = storm_fleet
    schema = _schema(fleet)
    agent = fleet.agents[TARGET]
    storm, per_topic = build_storm(schema)
    # Payloads over the broker's message_size_limit never reach anyone (the flood test shows
    # it); they are left out here rather than counted as delivered.
    limit = BrokerLimits().message_size_limit
    oversize = [p for p in storm if len(p.payload) > limit]
    storm = [p for p in storm if len(p.payload) <= limit]
    per_topic.subtract(Counter(p.topic for p in oversize))
    print(f"\n{len(oversize)} payloads over message_size_limit ({limit} B) left out")
    must_reject = _rejected_by_decoding(schema, storm)
    print(f"\nstorm: {len(storm)} payloads on {len(per_topic)} topics")
    for topic, n in sorted(per_topic.items()):
        print(f"  {n:5d}  {topic!r}")
    assert len(storm) >= 10_000
    fleet.wait(lambda: _newest_seq(fleet, TARGET) > 0, 30, f"telemetry from {TARGET}")

    started = time.monotonic()
    from_device = f"{schema.devices_prefix}{FUZZ_DEVICE}/"
    acked = publish_storm(storm_client, [p for p in storm
                                         if not p.topic.startswith(from_device)])
    acked += publish_storm(device_client, [p for p in storm if p.topic.startswith(from_device)])
    retained_topics = sorted({p.topic for p in storm if p.retain})
    publish_storm(device_client, [Publish(t, b"", retain=True) for t in retained_topics])
    print(f"published and acknowledged {acked} in {time.monotonic() - started:.1f}s")
    assert acked == len(storm)

    # The controller logged every payload that does not decode as rejected, and went on.
    fleet.wait(_unless_crashed(fleet, lambda: _controller_rejections(fleet.serve_log())
                               >= must_reject), 60,
               f"the controller to log {must_reject} rejected payloads from {FUZZ_DEVICE}")
    # The agent said which commands were malformed, and reported them rejected.
    fleet.wait(lambda: "malformed message on" in agent.log_text(), 30, "the agent's log")
    fleet.wait(_unless_crashed(fleet, lambda: bool(fleet.query(
        "SELECT 1 FROM command_statuses WHERE device_id = :d AND state = 'rejected' "
        "AND reason LIKE 'malformed:%' LIMIT 1", d=TARGET))), 60,
        "the agent's 'rejected' status for a malformed command")

    # An operator's config puts the agent's intervals back wherever the storm's configs left
    # them; the agent applies it, and from then on its telemetry and heartbeats keep coming.
    heartbeats = _watch(storm_client, schema.build(Channel.HEARTBEAT, TARGET))
    before = _newest_seq(fleet, TARGET)
    publish_storm(storm_client, [Publish(schema.command(TARGET, CommandKind.CONFIG), encode(
        ConfigCommand(command_id="fuzz-restore", ts=time.time(), telemetry_interval_s=0.5,
                      heartbeat_interval_s=1.0)))])
    fleet.wait(lambda: bool(fleet.query(
        "SELECT 1 FROM command_statuses WHERE device_id = :d AND command_id = 'fuzz-restore' "
        "AND state = 'succeeded'", d=TARGET)), 30, "the agent to apply a good config")
    fleet.wait(_unless_crashed(fleet, lambda: _newest_seq(fleet, TARGET) > before), 30,
               f"new telemetry from {TARGET} after the storm (seq > {before})")
    _drain(heartbeats)
    try:
        heartbeats.get(timeout=10)
    except queue.Empty:
        raise AssertionError(f"no heartbeat from {TARGET} in 10s after a config with "
                             "heartbeat_interval_s=1.0 (the storm's configs left it silent)"
                             ) from None

    # The controller still stores a good window.
    window = TelemetryBatch(device_id=FUZZ_DEVICE, seq=10**12, window_start=time.time() - 1,
                            window_end=time.time(), model=None, inferences=7)
    publish_storm(device_client, [Publish(schema.build(Channel.TELEMETRY, FUZZ_DEVICE),
                                          encode(window))])
    fleet.wait(lambda: bool(fleet.query(
        "SELECT 1 FROM telemetry WHERE device_id = :d AND seq = :s AND inferences = 7",
        d=FUZZ_DEVICE, s=window.seq)), 30, "the good window after the storm")

    # And a real deploy still goes through to the stormed agent.
    fleet.cli("models", "add", str(SOURCE), "--data", str(DATA), "--only", "onnx-fp32")
    out = fleet.cli("rollouts", "create", "--name", "after-the-storm", "--model", "digits",
                    "--version", "1", "--device", TARGET, "--groups", "100", "--watch", "1")
    rollout_id = out.split()[1]
    fleet.cli("rollouts", "start", rollout_id)
    fleet.wait(_unless_crashed(fleet, lambda: fleet.rollout_state(rollout_id) in (
        "succeeded", "failed", "paused")), 90, "the rollout after the storm")
    assert fleet.rollout_state(rollout_id) == "succeeded", fleet.query(
        "SELECT state, stage, reason FROM command_statuses WHERE device_id = :d AND command_id "
        "LIKE :c ORDER BY id", d=TARGET, c=f"{rollout_id}:%")

    assert fleet.serve is not None and fleet.serve.poll() is None, "edgefleet serve exited"
    assert all(a.alive for a in fleet.agents.values()), "an agent exited"
    assert _first_traceback(fleet.serve_log()) is None, _first_traceback(fleet.serve_log())
    assert _first_traceback(agent.log_text()) is None, _first_traceback(agent.log_text())
