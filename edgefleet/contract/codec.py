"""Encoding and decoding of wire messages, with one error type for every bad payload.

Each channel's payload type and encoding come from tables here and in contract.topics. Decoding
accepts JSON on every channel, so a debugging operator can publish JSON by hand with
mosquitto_pub, and MessagePack where the channel uses it (a MessagePack map's first byte is one
no JSON text starts with).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from edgefleet.contract.errors import DecodeError, EncodeError
from edgefleet.contract.messages import (
    ArtifactChunk,
    ChunkRequest,
    CommandStatus,
    ConfigCommand,
    DeployCommand,
    DeviceFacts,
    Heartbeat,
    Presence,
    RollbackCommand,
    ShadowCommand,
    TelemetryBatch,
    WireMessage,
)
from edgefleet.contract.topics import CHANNELS, Channel, CommandKind, Encoding, Topic

M = TypeVar("M", bound=WireMessage)

CHANNEL_TYPES: Mapping[Channel, type[WireMessage]] = {
    Channel.PRESENCE: Presence,
    Channel.FACTS: DeviceFacts,
    Channel.HEARTBEAT: Heartbeat,
    Channel.TELEMETRY: TelemetryBatch,
    Channel.STATUS: CommandStatus,
    Channel.CHUNK_REQUEST: ChunkRequest,
    Channel.CHUNK: ArtifactChunk,
}

COMMAND_TYPES: Mapping[CommandKind, type[WireMessage]] = {
    CommandKind.DEPLOY: DeployCommand,
    CommandKind.ROLLBACK: RollbackCommand,
    CommandKind.SHADOW: ShadowCommand,
    CommandKind.CONFIG: ConfigCommand,
}

_ENCODING_OF_TYPE: Mapping[type[WireMessage], Encoding] = {
    **{t: CHANNELS[c].encoding for c, t in CHANNEL_TYPES.items()},
    **{t: CHANNELS[Channel.COMMAND].encoding for t in COMMAND_TYPES.values()},
}

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_json_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_msgpack_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)
_EXPECTED_GOT = re.compile(r"^Expected `(?P<expected>.+?)`, got `(?P<got>.+?)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")


def encode(message: WireMessage) -> bytes:
    """Wire bytes for a message, in its channel's encoding (JSON unless said otherwise)."""
    if message.v != type(message).VERSION:
        raise EncodeError(type(message).__name__, "$.v", str(type(message).VERSION),
                          str(message.v))
    if _ENCODING_OF_TYPE.get(type(message)) is Encoding.MSGPACK:
        return _msgpack_encoder.encode(message)
    return _json_encoder.encode(message)


def decode(message_type: type[M], payload: bytes) -> M:
    """Decodes and validates one payload, or raises `DecodeError` naming field, expected, got."""
    what = message_type.__name__
    is_json = not payload or not (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF))
    if not is_json and _ENCODING_OF_TYPE.get(message_type) is not Encoding.MSGPACK:
        # JSON is accepted everywhere (an operator can publish by hand), MessagePack only where
        # the channel uses it: a JSON message carries raw signed JSON (the manifest) and no
        # NaN or infinity, which a MessagePack payload could smuggle in.
        raise DecodeError(what, "$", "a JSON object", "a MessagePack map")
    try:
        if is_json:
            decoder = _json_decoders.get(message_type)
            if decoder is None:
                decoder = _json_decoders[message_type] = msgspec.json.Decoder(message_type)
            message: M = decoder.decode(payload)
        else:
            mp_decoder = _msgpack_decoders.get(message_type)
            if mp_decoder is None:
                mp_decoder = _msgpack_decoders[message_type] = msgspec.msgpack.Decoder(
                    message_type)
            message = mp_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise _validation_error(what, str(exc)) from None
    # Invalid UTF-8 in a string raises UnicodeDecodeError, deep nesting RecursionError: the
    # peer's malformed payload like any other.
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(what, "$", "a JSON object or a MessagePack map",
                          f"malformed payload ({exc})") from None
    if not 1 <= message.v <= message_type.VERSION:
        raise DecodeError(what, "$.v", f"a schema version from 1 to {message_type.VERSION}",
                          str(message.v))
    return message


def decode_topic(topic: Topic, payload: bytes) -> WireMessage:
    """Decodes a payload by the type its topic carries."""
    if topic.command is not None:
        return decode(COMMAND_TYPES[topic.command], payload)
    message_type = CHANNEL_TYPES.get(topic.channel)
    if message_type is None:
        raise DecodeError("topic", "$", "a channel with a payload type", topic.channel.value)
    return decode(message_type, payload)


def decode_json_object(payload: bytes, what: str) -> dict[str, Any]:
    """A payload as a plain JSON object, for canonical signing of what was received."""
    try:
        obj = msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(what, "$", "a JSON object", f"malformed payload ({exc})") from None
    if not isinstance(obj, dict):
        raise DecodeError(what, "$", "a JSON object", type(obj).__name__)
    return obj


def _validation_error(what: str, text: str) -> DecodeError:
    at = _AT.match(text)
    message, path = (at.group("msg"), at.group("path") or "$") if at else (text, "$")
    if m := _EXPECTED_GOT.match(message):
        return DecodeError(what, path, m.group("expected"), m.group("got"))
    if m := _MISSING.match(message):
        return DecodeError(what, f"{path}.{m.group('field')}", "a required field", "nothing")
    return DecodeError(what, path, "a valid value", message)
