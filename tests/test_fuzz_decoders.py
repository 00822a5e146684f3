"""Fuzzing every decoder that takes bytes from the network (issue 8): each either returns a value
of the right type or raises the contract's own error, never anything else, whatever it is fed.

Decoders: `decode` for every message type and the manifest, `decode_topic` for every topic,
`decode_json_object`, `verify_manifest`, `TopicSchema.parse`, the key chain's `advance`, the
agent's MQTT adapter (`AgentLink._handle_message`) and the controller's ingest writers (SQLite).
Payloads come from tests/fuzz_payloads.py. Hypothesis examples per test, derandomized so CI
sees the same ones every run (in the first eight tests each payload goes through 25 decoder
calls: 12 message types, 11 topics, `decode_json_object` and `verify_manifest`):

    random bytes 1500, random JSON 1500, random MessagePack 1000, golden messages with fields
    changed 2000, golden messages with one byte changed 1500, MessagePack chunks 800, very long
    strings 150, deep nesting 300, deploys re-encoded by the agent 1000, topics 800, the agent's
    MQTT adapter 800, the controller's ingest 800, the key chain 600: 12,750 in all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from agent.config import BrokerConfig
from agent.mqtt import AgentLink, Inbound, Malformed, Outgoing
from controller.db import make_engine, upgrade
from controller.db.ingest import (
    FactsWriter,
    HeartbeatWriter,
    PresenceWriter,
    StatusWriter,
    TelemetryWriter,
    WriteResult,
)
from edgefleet.contract import (
    CHANNEL_TYPES,
    COMMAND_TYPES,
    Channel,
    CommandKind,
    DecodeError,
    DeployCommand,
    Manifest,
    ManifestRejected,
    Topic,
    TopicSchema,
    WireMessage,
    decode,
    decode_topic,
    encode,
)
from edgefleet.contract.codec import decode_json_object
from edgefleet.contract.keylist import Advance, KeyList, advance, sign_key_list, trusted_key
from edgefleet.contract.signing import key_id, verify_manifest
from tests import fuzz_payloads as fp
from tests.contract_examples import MANIFEST, T0, TEST_SIGNING_KEY

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

SCHEMA = TopicSchema("fuzz/edgefleet")
DEVICE = "pi-7"
MESSAGE_TYPES: list[type[WireMessage]] = sorted(
    {*CHANNEL_TYPES.values(), *COMMAND_TYPES.values(), Manifest}, key=lambda t: t.__name__)
TOPICS: dict[Topic, type[WireMessage]] = {
    **{Topic(c, DEVICE): t for c, t in CHANNEL_TYPES.items()},
    **{Topic(Channel.COMMAND, DEVICE, k): t for k, t in COMMAND_TYPES.items()},
}
TRUSTED = {key_id(TEST_SIGNING_KEY.public_key()): TEST_SIGNING_KEY.public_key()}
# The documented device id alphabet, matched against the whole id.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _contained(what: str, call: Callable[[], Any], payload: bytes | str,
               allowed: type[Exception] | tuple[type[Exception], ...] = ()) -> Any:
    """`call()`'s value, or None if it raised `allowed`; any other exception fails the test,
    naming the decoder and the input."""
    try:
        return call()
    except allowed:
        return None
    except Exception as exc:
        expected = getattr(allowed, "__name__", "no exception")
        raise AssertionError(f"{what} raised {type(exc).__name__} ({exc}), expected "
                             f"{expected}, for {len(payload)} bytes: {payload[:120]!r}") from exc


def assert_every_decoder_contains(payload: bytes) -> None:
    for message_type in MESSAGE_TYPES:
        message = _contained(f"decode({message_type.__name__})",
                             partial(decode, message_type, payload), payload, DecodeError)
        assert message is None or type(message) is message_type
    for topic, message_type in TOPICS.items():
        message = _contained(f"decode_topic({topic})",
                             partial(decode_topic, topic, payload), payload, DecodeError)
        assert message is None or type(message) is message_type
    obj = _contained("decode_json_object", lambda: decode_json_object(payload, "fuzz"),
                     payload, DecodeError)
    assert obj is None or isinstance(obj, dict)
    manifest = _contained("verify_manifest", lambda: verify_manifest(
        payload, TRUSTED, device_id=MANIFEST.device_id, now=T0), payload, ManifestRejected)
    assert manifest is None or type(manifest) is Manifest


# --- the contract's decoders ---------------------------------------------------------------------

@settings(FUZZ, max_examples=1500)
@given(fp.random_bytes)
def test_random_bytes_decode_or_raise_decode_error(payload: bytes) -> None:
    assert_every_decoder_contains(payload)


@settings(FUZZ, max_examples=1500)
@given(fp.random_json)
def test_random_json_values_decode_or_raise_decode_error(payload: bytes) -> None:
    assert_every_decoder_contains(payload)


@settings(FUZZ, max_examples=1000)
@given(fp.random_msgpack | fp.msgpack_garbage)
def test_random_messagepack_decodes_or_raises_decode_error(payload: bytes) -> None:
    assert_every_decoder_contains(payload)


@settings(FUZZ, max_examples=2000)
@given(fp.tagged_objects())
def test_golden_messages_with_fields_dropped_retyped_or_extreme_decode_or_raise(
        payload: bytes) -> None:
    assert_every_decoder_contains(payload)


@settings(FUZZ, max_examples=1500)
@given(fp.golden_with_one_byte_changed())
def test_golden_messages_with_one_byte_changed_decode_or_raise(payload: bytes) -> None:
    assert_every_decoder_contains(payload)


@settings(FUZZ, max_examples=800)
@given(fp.msgpack_chunks())
def test_messagepack_chunks_decode_or_raise_decode_error(payload: bytes) -> None:
    assert_every_decoder_contains(payload)


@settings(FUZZ, max_examples=150)
@given(st.builds(fp.to_json, fp.long_strings())
       | st.builds(lambda tag, s: fp.to_json({**fp.GOLDEN_OBJECTS[tag], "zz": s}),
                   st.sampled_from(fp.TAGS), fp.long_strings()))
def test_very_long_strings_decode_or_raise_decode_error(payload: bytes) -> None:
    assert_every_decoder_contains(payload)


@settings(FUZZ, max_examples=300)
@given(fp.deeply_nested())
@example(b'{"type":"heartbeat","v":1,"device_id":"pi-7","ts":1.0,"uptime_s":1.0,"zz":'
         + b"[" * 5_000 + b"]" * 5_000 + b"}")
def test_deeply_nested_payloads_raise_decode_error_not_recursion_error(payload: bytes) -> None:
    assert_every_decoder_contains(payload)


@settings(FUZZ, max_examples=1000)
@given(fp.tagged_objects(tags=["deploy"]) | fp.golden_with_one_byte_changed(tags=["deploy"]))
@example(fp.to_msgpack(fp.GOLDEN_OBJECTS["deploy"]))
def test_a_deploy_the_agent_accepts_survives_its_re_encoding(payload: bytes) -> None:
    """The agent queues a received deploy as `encode(command)` and decodes it again when the
    installer takes it (agent.service `_enqueue`, agent.install.runner `run_next`)."""
    command = _contained("decode(DeployCommand)", lambda: decode(DeployCommand, payload),
                         payload, DecodeError)
    if command is None:
        return
    queued = encode(command)
    again = _contained("decode(DeployCommand) of the re-encoded deploy",
                       lambda: decode(DeployCommand, queued), queued)
    assert again == command, f"re-encoded as {queued[:200]!r}"


@settings(FUZZ, max_examples=800)
@given(st.text(max_size=80)
       | st.builds(lambda d, rest: f"{SCHEMA.devices_prefix}{d}/{rest}",
                   st.text(alphabet=st.characters(codec="utf-8"), max_size=70)
                   | st.from_regex(DEVICE_ID, fullmatch=True),
                   st.sampled_from([c.value for c in Channel] + [
                       f"cmd/{k.value}" for k in CommandKind] + ["cmd", "cmd/", "", "x/y"])))
@example(f"{SCHEMA.devices_prefix}pi-7\n/telemetry")
def test_a_parsed_topic_names_a_valid_device_and_builds_back_to_itself(topic: str) -> None:
    parsed = _contained("TopicSchema.parse", lambda: SCHEMA.parse(topic), topic, DecodeError)
    if parsed is None:
        return
    assert DEVICE_ID.fullmatch(parsed.device_id), f"device id {parsed.device_id!r}"
    assert SCHEMA.build(parsed.channel, parsed.device_id, parsed.command) == topic


# --- the key chain the agent follows -------------------------------------------------------------

FIRST_LIST = KeyList(version=1, issued_at=T0, keys=(trusted_key(TEST_SIGNING_KEY.public_key()),))
NEXT_LIST = json.loads(sign_key_list(
    KeyList(version=2, issued_at=T0 + 1, keys=FIRST_LIST.keys), [TEST_SIGNING_KEY]))


@settings(FUZZ, max_examples=600)
@given(fp.payloads() | fp.deeply_nested()
       | st.lists(st.builds(fp.to_json, fp.mutated(NEXT_LIST, True)), max_size=3)
       .map(lambda lists: b"[" + b",".join(lists) + b"]"))
def test_a_published_key_chain_advances_or_stops_with_a_reason(payload: bytes) -> None:
    result = _contained("keylist.advance", lambda: advance(FIRST_LIST, payload), payload)
    assert isinstance(result, Advance)
    assert result.current.version >= FIRST_LIST.version


# --- the agent's MQTT adapter --------------------------------------------------------------------

AGENT_TOPICS = [
    *(SCHEMA.command(DEVICE, k) for k in CommandKind), SCHEMA.build(Channel.CHUNK, DEVICE),
    f"{SCHEMA.devices_prefix}{DEVICE}/cmd/reboot", f"{SCHEMA.devices_prefix}{DEVICE}/cmd/",
    SCHEMA.command("pi-8", CommandKind.DEPLOY), SCHEMA.build(Channel.TELEMETRY, DEVICE),
]


@pytest.fixture(scope="module")
def agent_link() -> Iterator[tuple[AgentLink, list[Any]]]:
    """The agent's adapter, never connected: messages are handed to its paho callback."""
    received: list[Any] = []
    link = AgentLink(DEVICE, BrokerConfig(topic_root=SCHEMA.root), on_inbound=received.append,
                     on_connection=lambda up: None, on_published=lambda mid: None,
                     will=Outgoing(SCHEMA.build(Channel.PRESENCE, DEVICE), b"", 1, True),
                     birth=list)
    yield link, received


@settings(FUZZ, max_examples=800)
@given(topic=st.sampled_from(AGENT_TOPICS), payload=fp.payloads() | fp.deeply_nested())
@example(topic=AGENT_TOPICS[0], payload=b'{"type":"deploy","v":"x","zz":' + b"[" * 5_000 + b"}")
def test_the_agent_link_turns_any_message_into_inbound_or_malformed(
        agent_link: tuple[AgentLink, list[Any]], topic: str, payload: bytes) -> None:
    link, received = agent_link
    received.clear()
    message = paho.MQTTMessage(topic=topic.encode())
    message.payload = payload
    _contained("AgentLink._handle_message", lambda: link._handle_message(
        link._client, None, message), payload)
    [item] = received
    assert isinstance(item, Inbound | Malformed)
    if isinstance(item, Inbound):
        assert item.topic.device_id == DEVICE
        assert type(item.message) is TOPICS[item.topic]
    else:
        assert item.reason
        assert item.command_id is None or len(item.command_id) <= 128


# --- the controller's ingest ---------------------------------------------------------------------

WRITERS = {Channel.TELEMETRY: TelemetryWriter, Channel.STATUS: StatusWriter,
           Channel.PRESENCE: PresenceWriter, Channel.FACTS: FactsWriter,
           Channel.HEARTBEAT: HeartbeatWriter}


@pytest.fixture(scope="module")
def ingest_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{Path(tmp_path_factory.mktemp('fuzz')) / 'fleet.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@settings(FUZZ, max_examples=800)
@given(channel=st.sampled_from(sorted(WRITERS, key=lambda c: c.value)),
       payload=fp.payloads(device_id=DEVICE) | fp.deeply_nested())
def test_the_controllers_ingest_stores_or_rejects_any_payload(
        ingest_engine: Engine, channel: Channel, payload: bytes) -> None:
    writer = WRITERS[channel](ingest_engine)
    result = _contained(f"{type(writer).__name__}.write", lambda: writer.write(
        [(DEVICE, payload)]), payload)
    assert isinstance(result, WriteResult)
    assert result.stored + result.duplicates + len(result.malformed) == 1
