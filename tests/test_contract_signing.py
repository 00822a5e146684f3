"""Manifest signing: one implementation, and every way a manifest can be wrong is refused."""

from __future__ import annotations

import msgspec
import pytest

from edgefleet.contract import ManifestRejected, VariantKind
from edgefleet.contract.signing import (
    generate_private_key,
    key_id,
    private_key_from_pem,
    private_key_to_pem,
    public_key_from_pem,
    public_key_to_pem,
    sign_manifest,
    verify_manifest,
)
from tests.contract_examples import MANIFEST, T0

KEY = generate_private_key()
TRUSTED = {key_id(KEY.public_key()): KEY.public_key()}
DEVICE = MANIFEST.device_id


def _verify(payload: bytes, now: float = T0 + 60) -> object:
    return verify_manifest(payload, TRUSTED, device_id=DEVICE, now=now)


def _tamper(payload: bytes, **changes: object) -> bytes:
    obj = msgspec.json.decode(payload)
    obj.update(changes)
    return msgspec.json.encode(obj)


def _reason(payload: bytes, **kwargs: float) -> str:
    with pytest.raises(ManifestRejected) as err:
        _verify(payload, **kwargs)
    return err.value.reason


def test_a_signed_manifest_verifies_and_names_its_key() -> None:
    manifest = _verify(sign_manifest(MANIFEST, KEY))
    assert manifest == msgspec.structs.replace(MANIFEST, key_id=key_id(KEY.public_key()),
                                               signature=manifest.signature)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("change", "reason"), [
    ({"model_version": 3}, "bad-signature"),
    ({"sha256": "0" * 64}, "bad-signature"),
    ({"device_id": "coral-usb-0008"}, "bad-signature"),
    ({"signature": ""}, "unsigned"),
    ({"key_id": ""}, "unsigned"),
    ({"key_id": "0123456789abcdef"}, "unknown-key"),
    ({"model_version": "three"}, "malformed"),
])
def test_changed_manifests_are_rejected(change: dict[str, object], reason: str) -> None:
    assert _reason(_tamper(sign_manifest(MANIFEST, KEY), **change)) == reason


def test_a_manifest_signed_by_an_untrusted_key_is_rejected() -> None:
    assert _reason(sign_manifest(MANIFEST, generate_private_key())) == "unknown-key"


def test_a_manifest_for_another_device_is_rejected() -> None:
    other = msgspec.structs.replace(MANIFEST, device_id="pi4-0001")
    assert _reason(sign_manifest(other, KEY)) == "wrong-device"


def test_an_expired_manifest_is_rejected() -> None:
    assert _reason(sign_manifest(MANIFEST, KEY), now=MANIFEST.expires_at) == "expired"


def test_an_unknown_variant_kind_is_refused_even_when_signed() -> None:
    obj = msgspec.to_builtins(MANIFEST)
    obj["variant_kind"] = "onnx-int4"
    future = msgspec.json.decode(msgspec.json.encode(obj), type=type(MANIFEST))
    assert future.variant_kind is VariantKind.UNKNOWN
    assert _reason(sign_manifest(future, KEY)) == "unsupported"


def test_fields_added_by_a_newer_controller_are_covered_by_the_signature() -> None:
    # A newer controller signs a field this agent does not know; the canonical form is built from
    # what was received, so the manifest still verifies, and changing that field breaks it.
    from edgefleet.contract.signing import canonical_bytes

    obj = msgspec.to_builtins(msgspec.structs.replace(MANIFEST, key_id=key_id(KEY.public_key())))
    obj["min_agent_version"] = "0.2.0"
    obj["signature"] = KEY.sign(canonical_bytes(obj))
    payload = msgspec.json.encode(obj)
    assert _verify(payload).model_version == MANIFEST.model_version  # type: ignore[attr-defined]
    assert _reason(_tamper(payload, min_agent_version="0.1.0")) == "bad-signature"


@pytest.mark.parametrize("payload", [b"", b"not json", b"[]", b'{"type":"manifest"}'])
def test_garbage_is_rejected_as_malformed(payload: bytes) -> None:
    assert _reason(payload) == "malformed"


def test_keys_round_trip_through_pem_and_keep_their_id() -> None:
    again = private_key_from_pem(private_key_to_pem(KEY))
    public = public_key_from_pem(public_key_to_pem(KEY.public_key()))
    assert key_id(again.public_key()) == key_id(public) == key_id(KEY.public_key())
    assert len(key_id(public)) == 16
