"""Golden files pin the wire format: each decodes to its example and re-encodes byte for byte."""

from __future__ import annotations

import msgspec
import pytest

from edgefleet.contract import CHANNEL_TYPES, COMMAND_TYPES, DeployCommand, Manifest, decode, encode
from edgefleet.contract.signing import key_id, verify_manifest
from tests.contract_examples import (
    EXAMPLES,
    GOLDEN_DIR,
    MANIFEST,
    T0,
    TEST_SIGNING_KEY,
    golden_manifest_path,
    golden_path,
)


def test_every_wire_type_has_an_example_and_a_golden_file() -> None:
    wire_types = set(CHANNEL_TYPES.values()) | set(COMMAND_TYPES.values())
    assert {type(m) for m in EXAMPLES.values()} == wire_types
    expected = {golden_path(n, m).name for n, m in EXAMPLES.items()} | {
        golden_manifest_path().name}
    assert {p.name for p in GOLDEN_DIR.glob("*.json")} == expected


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_golden_file_decodes_to_the_example_and_re_encodes_byte_for_byte(name: str) -> None:
    example = EXAMPLES[name]
    golden = golden_path(name, example).read_bytes().rstrip(b"\n")
    decoded = decode(type(example), golden)
    assert decoded == example
    assert msgspec.json.encode(decoded) == golden


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_wire_encoding_round_trips(name: str) -> None:
    example = EXAMPLES[name]
    assert decode(type(example), encode(example)) == example


def test_chunks_travel_as_messagepack_and_everything_else_as_json() -> None:
    for name, example in EXAMPLES.items():
        first = encode(example)[:1]
        assert (first != b"{") == (name == "chunk"), name


def test_golden_manifest_is_signed_by_the_test_key_and_verifies() -> None:
    payload = golden_manifest_path().read_bytes().rstrip(b"\n")
    trusted = {key_id(TEST_SIGNING_KEY.public_key()): TEST_SIGNING_KEY.public_key()}
    manifest = verify_manifest(payload, trusted, device_id=MANIFEST.device_id, now=T0 + 1)
    assert msgspec.structs.replace(manifest, key_id="", signature=b"") == MANIFEST
    assert msgspec.json.encode(decode(Manifest, payload)) == payload


def test_deploy_golden_carries_the_signed_manifest_bytes_verbatim() -> None:
    golden = golden_path("deploy", EXAMPLES["deploy"]).read_bytes().rstrip(b"\n")
    command = decode(DeployCommand, golden)
    trusted = {key_id(TEST_SIGNING_KEY.public_key()): TEST_SIGNING_KEY.public_key()}
    manifest = verify_manifest(bytes(command.manifest), trusted,
                               device_id=MANIFEST.device_id, now=T0 + 1)
    assert manifest.model_version == MANIFEST.model_version
