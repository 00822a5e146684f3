"""Decoding bad bytes raises one error type naming field, expected and got; readers are lenient
where the contract says so (unknown fields, unknown statuses) and strict everywhere else."""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract import (
    CHANNEL_TYPES,
    COMMAND_TYPES,
    ArtifactChunk,
    CommandKind,
    CommandState,
    CommandStatus,
    ContractError,
    DecodeError,
    DeployCommand,
    EncodeError,
    Heartbeat,
    Presence,
    PresenceState,
    TelemetryBatch,
    Topic,
    TopicSchema,
    VariantKind,
    decode,
    decode_topic,
    encode,
)
from edgefleet.contract.messages import ActiveModel
from tests.contract_examples import EXAMPLES

ALL_TYPES = sorted({*CHANNEL_TYPES.values(), *COMMAND_TYPES.values()}, key=lambda t: t.__name__)


def _with(name: str, **changes: object) -> bytes:
    obj = msgspec.json.decode(msgspec.json.encode(EXAMPLES[name]))
    obj.update(changes)
    return msgspec.json.encode(obj)


def test_unknown_fields_are_ignored() -> None:
    payload = _with("telemetry", gpu_util=0.5, future={"nested": [1, 2]})
    assert decode(TelemetryBatch, payload) == EXAMPLES["telemetry"]


def test_unknown_status_values_decode_as_unknown() -> None:
    status = decode(CommandStatus, _with("status", state="paused-by-operator", stage="flashing"))
    assert status.state is CommandState.UNKNOWN
    assert status.stage is not None and status.stage.value == "unknown"
    presence = decode(Presence, _with("presence", state="sleeping"))
    assert presence.state is PresenceState.UNKNOWN


def test_unknown_variant_kind_in_telemetry_decodes_as_unknown() -> None:
    model = msgspec.json.decode(msgspec.json.encode(EXAMPLES["telemetry"]))["model"]
    model["variant_kind"] = "onnx-int4"
    batch = decode(TelemetryBatch, _with("telemetry", model=model))
    assert isinstance(batch.model, ActiveModel)
    assert batch.model.variant_kind is VariantKind.UNKNOWN


@pytest.mark.parametrize(("payload", "field", "expected", "got"), [
    (_with("telemetry", seq="forty-two"), "$.seq", "int", "str"),
    (_with("heartbeat", uptime_s=None), "$.uptime_s", "float", "null"),
    (_with("telemetry", latency={"p50_ms": 1.0}), "$.latency.p95_ms", "a required field",
     "nothing"),
    (b'{"type":"heartbeat","v":1,"ts":1.0,"uptime_s":1.0}', "$.device_id", "a required field",
     "nothing"),
    (b"[1, 2, 3]", "$", "object", "array"),
    (b'{"type": "heartbeat", "device_id": ', "$", "a JSON object or a MessagePack map", None),
    (b"", "$", "a JSON object or a MessagePack map", None),
])
def test_bad_payloads_raise_decode_error_naming_field_expected_and_got(
        payload: bytes, field: str, expected: str, got: str | None) -> None:
    with pytest.raises(DecodeError) as err:
        decode(Heartbeat if b"heartbeat" in payload else TelemetryBatch, payload)
    assert err.value.field == field
    assert err.value.expected == expected
    if got is not None:
        assert err.value.got == got
    assert isinstance(err.value, ContractError)


def test_a_payload_of_another_type_is_refused_by_its_tag() -> None:
    with pytest.raises(DecodeError) as err:
        decode(TelemetryBatch, encode(EXAMPLES["heartbeat"]))
    assert err.value.field == "$.type"


@pytest.mark.parametrize("version", [0, 2, -1])
def test_unsupported_schema_versions_are_refused(version: int) -> None:
    with pytest.raises(DecodeError) as err:
        decode(Heartbeat, _with("heartbeat", v=version))
    assert err.value.field == "$.v"
    assert str(version) in str(err.value)


def test_we_refuse_to_encode_a_version_we_do_not_speak() -> None:
    bad = msgspec.structs.replace(EXAMPLES["heartbeat"], v=3)
    with pytest.raises(EncodeError):
        encode(bad)


def test_decode_topic_picks_the_type_from_the_topic() -> None:
    schema = TopicSchema()
    deploy = schema.parse(schema.command("coral-usb-0007", CommandKind.DEPLOY))
    assert decode_topic(deploy, encode(EXAMPLES["deploy"])) == EXAMPLES["deploy"]
    with pytest.raises(DecodeError):
        decode_topic(Topic(deploy.channel, "x", CommandKind.CONFIG), encode(EXAMPLES["deploy"]))


def test_operators_may_publish_json_on_a_messagepack_channel() -> None:
    chunk = EXAMPLES["chunk"]
    assert decode(type(chunk), msgspec.json.encode(chunk)) == chunk


@settings(max_examples=300)
@given(message_type=st.sampled_from(ALL_TYPES), payload=st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_contract_errors(message_type: type, payload: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(message_type, payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=300)
@given(name=st.sampled_from(sorted(EXAMPLES)), field=st.text(max_size=12), value=json_values)
def test_mutated_valid_payloads_decode_or_raise_contract_errors(name: str, field: str,
                                                                value: object) -> None:
    obj = msgspec.json.decode(msgspec.json.encode(EXAMPLES[name]))
    key = field if field else next(iter(obj))
    obj[key] = value
    try:
        decoded = decode(type(EXAMPLES[name]), msgspec.json.encode(obj))
    except DecodeError:
        return
    assert type(decoded) is type(EXAMPLES[name])


def test_messagepack_is_accepted_only_on_channels_that_use_it() -> None:
    """A MessagePack deploy once put MessagePack bytes where the agent keeps signed JSON, and
    the queued command could never be read back; JSON stays accepted everywhere."""
    golden = Path(__file__).parent / "golden" / "deploy.v1.json"
    as_msgpack = msgspec.msgpack.encode(msgspec.json.decode(golden.read_bytes()))
    with pytest.raises(DecodeError, match="MessagePack"):
        decode(DeployCommand, as_msgpack)
    chunk = ArtifactChunk(artifact_id="a", index=0, total=1, data=b"\x00\x01")
    assert decode(ArtifactChunk, encode(chunk)) == chunk                  # MessagePack
    assert decode(ArtifactChunk, msgspec.json.encode(chunk)) == chunk     # JSON by hand


@pytest.mark.parametrize("payload", [
    b'{"type":"heartbeat","v":1,"device_id":"\xff","ts":1,"uptime_s":1}',
    b'{"type":"heartbeat","v":1,"device_id":"pi-7","ts":1.0,"uptime_s":1.0,"zz":'
    + b"[" * 5000 + b"]" * 5000 + b"}",
], ids=["invalid-utf8", "deep-nesting"])
def test_invalid_utf8_and_deep_nesting_are_decode_errors(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(Heartbeat, payload)
