"""What a broken or hostile peer might publish, as hypothesis strategies shared by the fuzz tests:
random bytes and JSON, golden messages with fields dropped, retyped or pushed to extremes, one
byte changed, MessagePack for the chunk channel, very long strings and very deep nesting."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hypothesis
import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

GOLDEN_DIR = Path(__file__).parent / "golden"
# Type tag -> the golden wire bytes of its current version (tests/golden/<tag>.v1.json).
GOLDEN: dict[str, bytes] = {path.name.split(".")[0]: path.read_bytes().strip()
                            for path in sorted(GOLDEN_DIR.glob("*.v1.json"))}
GOLDEN_OBJECTS: dict[str, dict[str, Any]] = {tag: json.loads(raw) for tag, raw in GOLDEN.items()}
TAGS = tuple(GOLDEN)
# Fields that name the sending device: set to the topic's device so some payloads get stored.
DEVICE_FIELD = "device_id"


class Raw:
    """Bytes spliced into the payload as they are: tokens no JSON or MessagePack library writes
    (NaN, 1e400, a lone surrogate, a map header claiming four billion entries)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Raw({self.data[:40]!r}{'...' if len(self.data) > 40 else ''})"


JSON_TOKENS = [Raw(t) for t in (
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400", b"-0", b"0e0",
    b"1E+2", b"9" * 400, b"-" + b"9" * 400, b"18446744073709551616", b"-9223372036854775809",
    b"9223372036854775808", b"1.7976931348623157e308", b"4.9e-324", b"01", b"1.", b".5", b"+1",
    b"0x10", b"true1", b"nul", b'"\\u0000"', b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\uffff"',
    b'"\\x41"', b'"\xff\xfe"', b'"\xc3"', b'"\xed\xa0\x80"', b"[1,]", b'{"a":1,}', b"{", b"]",
    b'"unterminated', b"", b" ", b"\x00", b"/* c */1",
)]
MSGPACK_TOKENS = [Raw(t) for t in (
    b"\xc1",                                   # never used
    b"\xa2\xff\xfe",                           # str, not UTF-8
    b"\xcb" + b"\x7f\xf8" + b"\x00" * 6,       # float64 NaN
    b"\xca\x7f\x80\x00\x00",                   # float32 inf
    b"\xcf" + b"\xff" * 8,                     # uint64 max
    b"\xd3\x80" + b"\x00" * 7,                 # int64 min
    b"\xd6\xff\x00\x00\x00\x00",               # timestamp ext
    b"\xc7\x00\xff",                           # timestamp ext of length 0
    b"\xd4\x01\x00",                           # fixext 1 of an unknown type
    b"\xdd\xff\xff\xff\xff",                   # array32 of 4 billion, then nothing
    b"\xdf\xff\xff\xff\xff",                   # map32 of 4 billion, then nothing
    b"\xdb\xff\xff\xff\xff",                   # str32 of 4 GiB, then nothing
    b"\xc6\xff\xff\xff\xff",                   # bin32 of 4 GiB, then nothing
    b"\x81\x01\x02",                           # map with an int key
    b"\x81\xc0\xc0",                           # map with a nil key
    b"\xc4\x00",                               # empty bin
    b"\xc0",                                   # nil
)]

EXTREME_NUMBERS: list[Any] = [
    0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1,
    10**30, -(10**30), 10**400, 0.0, -0.0, 5e-324, 1e-300, 1.7976931348623157e308, -1e308,
    math.nan, math.inf, -math.inf, True, False,
]

# --- plain values --------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62)
           | st.integers(max_value=-(2**62)) | st.floats() | st.text(max_size=40)
           | st.sampled_from(EXTREME_NUMBERS))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=16)
msgpack_values = st.recursive(
    scalars | st.binary(max_size=64), lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10) | st.integers(-5, 5), inner, max_size=5),
    max_leaves=16)


def long_strings(max_size: int = 1_000_000) -> st.SearchStrategy[str]:
    """Strings far longer than any field expects (built, not drawn char by char: fast)."""
    return st.builds(lambda unit, n: (unit * (n // len(unit) + 1))[:n],
                     st.sampled_from(["x", "\u00e9", "\U0001f600", "\x00", "ab\"\\", "\n"]),
                     st.integers(min_value=1_000, max_value=max_size))


def nested_raw(json_like: bool, depth: int, kind: str) -> Raw:
    """A value nested `depth` deep; `kind` picks arrays, maps, or an unclosed array."""
    if json_like:
        opening, leaf, closing = {"array": (b"[", b"1", b"]"), "map": (b'{"a":', b"1", b"}"),
                                  "unclosed": (b"[", b"", b"")}[kind]
    else:
        opening, leaf, closing = {"array": (b"\x91", b"\x01", b""),
                                  "map": (b"\x81\xa1a", b"\x01", b""),
                                  "unclosed": (b"\x91", b"", b"")}[kind]
    return Raw(opening * depth + leaf + closing * depth)


# --- writing payloads ----------------------------------------------------------------------------

def to_json(value: Any) -> bytes:
    """JSON text as a sloppy peer writes it: NaN and Infinity as bare words, integers of any
    size, `Raw` bytes spliced in, bytes as latin-1 text."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return b"{" + b",".join(json.dumps(str(k)).encode() + b":" + to_json(v)
                                for k, v in value.items()) + b"}"
    if isinstance(value, list | tuple):
        return b"[" + b",".join(to_json(v) for v in value) + b"]"
    if isinstance(value, bytes):
        return json.dumps(value.decode("latin-1")).encode()
    return json.dumps(value).encode()


def to_msgpack(value: Any) -> bytes:
    """MessagePack of `value`, with `Raw` bytes spliced in; what MessagePack cannot hold (an
    integer past 64 bits, a lone surrogate) goes as its nearest neighbour."""
    return msgspec.msgpack.encode(_msgpack_ready(value))


def _msgpack_ready(value: Any) -> Any:
    if isinstance(value, Raw):
        return msgspec.Raw(value.data)
    if isinstance(value, dict):
        return {_msgpack_ready(k): _msgpack_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_msgpack_ready(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not (
            -(2**63) <= value < 2**64):
        return float(value) if abs(value) < 10**300 else str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


# --- payloads ------------------------------------------------------------------------------------

random_bytes = st.binary(max_size=2_048)
random_json = st.builds(to_json, json_values)
random_msgpack = st.builds(to_msgpack, msgpack_values)
# Random bytes behind a MessagePack map header: the codec then takes the MessagePack path.
msgpack_garbage = st.builds(lambda head, rest: head + rest,
                            st.sampled_from([bytes([b]) for b in range(0x80, 0x90)]
                                            + [b"\xde\x00\x05", b"\xdf\x00\x00\x00\x05"]),
                            st.binary(max_size=512))


def field_values(json_like: bool) -> st.SearchStrategy[Any]:
    tokens = JSON_TOKENS if json_like else MSGPACK_TOKENS
    return (json_values if json_like else msgpack_values) | st.sampled_from(
        EXTREME_NUMBERS) | st.sampled_from(tokens) | long_strings(20_000) | st.sampled_from(
        [{}, [], "", " ", "unknown", "deploy", "x" * 129, "pi-1/../x", "+", "#", "$SYS"])


@st.composite
def mutated(draw: st.DrawFn, obj: dict[str, Any], json_like: bool,
            budget: int = 3) -> dict[str, Any]:
    """`obj` with up to `budget` changes: a field dropped, set to anything, added, or one of
    its nested objects changed the same way."""
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(0, budget))):
        keys = sorted(obj, key=repr)
        op = draw(st.sampled_from(["drop", "set", "set", "add", "nested", "retag", "version"]))
        if op == "drop" and keys:
            del obj[draw(st.sampled_from(keys))]
        elif op == "set" and keys:
            obj[draw(st.sampled_from(keys))] = draw(field_values(json_like))
        elif op == "add":
            obj[draw(st.text(max_size=12))] = draw(field_values(json_like))
        elif op == "nested":
            inner = [k for k in keys if isinstance(obj[k], dict)]
            if inner:
                key = draw(st.sampled_from(inner))
                obj[key] = draw(mutated(obj[key], json_like, budget=2))
        elif op == "retag":
            obj["type"] = draw(st.sampled_from(TAGS) | st.text(max_size=12))
        elif op == "version":
            obj["v"] = draw(st.integers() | st.sampled_from(EXTREME_NUMBERS))
    return obj


@st.composite
def tagged_objects(draw: st.DrawFn, tags: Sequence[str] = TAGS, device_id: str | None = None,
                   json_like: bool | None = None) -> bytes:
    """A golden message of one of `tags` with a few fields changed, as JSON or MessagePack."""
    tag = draw(st.sampled_from(tags))
    as_json = draw(st.booleans()) if json_like is None else json_like
    obj = copy.deepcopy(GOLDEN_OBJECTS[tag])
    if device_id is not None and DEVICE_FIELD in obj:
        obj[DEVICE_FIELD] = device_id
    if tag == "chunk" and not as_json:
        obj["data"] = draw(st.binary(max_size=4_096))   # MessagePack carries it as bytes
    obj = draw(mutated(obj, as_json))
    return to_json(obj) if as_json else to_msgpack(obj)


@st.composite
def golden_with_one_byte_changed(draw: st.DrawFn, tags: Sequence[str] = TAGS) -> bytes:
    raw = GOLDEN[draw(st.sampled_from(tags))]
    at = draw(st.integers(0, len(raw) - 1))
    op = draw(st.sampled_from(["replace", "delete", "insert", "truncate", "flip"]))
    if op == "replace":
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    if op == "flip":
        return raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1:]
    if op == "delete":
        return raw[:at] + raw[at + 1:]
    if op == "insert":
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at:]
    return raw[:at]


@st.composite
def deeply_nested(draw: st.DrawFn, tags: Sequence[str] = TAGS) -> bytes:
    """Nesting thousands deep, alone or inside a golden message (as an unknown field or in
    place of a known one), as JSON or MessagePack."""
    as_json = draw(st.booleans())
    raw = nested_raw(as_json, draw(st.integers(1_000, 50_000)),
                     draw(st.sampled_from(["array", "map", "unclosed"])))
    where = draw(st.sampled_from(["alone", "unknown-field", "known-field"]))
    if where == "alone":
        return raw.data
    obj = copy.deepcopy(GOLDEN_OBJECTS[draw(st.sampled_from(tags))])
    field = draw(st.sampled_from(sorted(obj))) if where == "known-field" else "zz"
    obj[field] = raw
    return to_json(obj) if as_json else to_msgpack(obj)


@st.composite
def msgpack_chunks(draw: st.DrawFn) -> bytes:
    """For the chunk channel: MessagePack chunks with fields pushed around, cut short, or with
    a token no encoder writes."""
    obj = copy.deepcopy(GOLDEN_OBJECTS["chunk"])
    obj["data"] = draw(st.binary(max_size=8_192))
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=3, unique=True)):
        obj[key] = draw(st.sampled_from(EXTREME_NUMBERS) | st.sampled_from(MSGPACK_TOKENS)
                        | msgpack_values)
    payload = to_msgpack(obj)
    if draw(st.booleans()):
        payload = payload[:draw(st.integers(0, len(payload)))]
    return payload


def payloads(tags: Sequence[str] = TAGS, device_id: str | None = None, *,
             longest: int = 1_000_000) -> st.SearchStrategy[bytes]:
    """Everything above but deep nesting, weighted towards messages that nearly decode;
    `longest` bounds the very long strings."""
    return st.one_of(
        random_bytes, random_json, random_msgpack, msgpack_garbage,
        tagged_objects(tags, device_id), tagged_objects(tags, device_id),
        tagged_objects(TAGS, device_id), golden_with_one_byte_changed(tags),
        golden_with_one_byte_changed(), st.builds(to_json, long_strings(longest)),
        st.builds(lambda tag, s: to_json({**GOLDEN_OBJECTS[tag], "zz": s}),
                  st.sampled_from(tags), long_strings(max(1_000, longest // 5))),
        st.sampled_from([b"", b"{}", b"[]", b"null", b"\x80", b"\x90", b"\xc0"]))


def draw_examples(strategy: st.SearchStrategy[Any], n: int, *, seed: int = 0) -> list[Any]:
    """`n` examples of `strategy`, the same ones on every run for the same `seed`."""
    drawn: list[Any] = []

    @hypothesis.seed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn
