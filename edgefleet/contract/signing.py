"""ed25519 signing and verification of manifests: one implementation for both sides.

The signature covers a canonical encoding of the manifest's JSON object as received: every
field but ``signature``, keys sorted, compact, prefixed with a domain tag. Canonicalising the
object as received (not our decoded struct) means fields added by a newer controller are covered
too and do not break verification on an older agent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.contract.codec import decode_json_object, encode
from edgefleet.contract.errors import DecodeError, ManifestRejected
from edgefleet.contract.manifest import Manifest
from edgefleet.contract.messages import FileFormat, VariantKind

DOMAIN = b"edgefleet-manifest-v1\n"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short stable name for a key: the first 16 hex digits of sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in obj.items() if k != "signature"}
    return DOMAIN + msgspec.json.encode(body, order="sorted")


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> bytes:
    """Returns the signed manifest as wire bytes (a JSON object)."""
    unsigned = msgspec.structs.replace(
        manifest, key_id=key_id(private_key.public_key()), signature=b"")
    obj = msgspec.to_builtins(unsigned)
    signature = private_key.sign(canonical_bytes(obj))
    return encode(msgspec.structs.replace(unsigned, signature=signature))


def verify_manifest(payload: bytes, trusted: Mapping[str, Ed25519PublicKey], *,
                    device_id: str, now: float, retired: Collection[str] = ()) -> Manifest:
    """Checks signature, key, target device and expiry; returns the manifest or raises.

    Raises `ManifestRejected` with a stable reason: malformed, unsigned, retired-key (signed by
    a key a rotation retired), unknown-key, bad-signature, wrong-device, expired, unsupported.
    Version ordering (replays) is the agent's business: it alone knows what it runs.
    """
    try:
        obj = decode_json_object(payload, "Manifest")
        manifest = msgspec.json.decode(payload, type=Manifest)
    except (DecodeError, msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestRejected("malformed", str(exc)) from None
    if manifest.v > Manifest.VERSION:
        raise ManifestRejected("unsupported", f"manifest version {manifest.v}")
    if not manifest.signature or not manifest.key_id:
        raise ManifestRejected("unsigned", "no signature or key id")
    public_key = trusted.get(manifest.key_id)
    if public_key is None and manifest.key_id in retired:
        raise ManifestRejected("retired-key", f"key {manifest.key_id} was retired by a rotation")
    if public_key is None:
        raise ManifestRejected("unknown-key", f"key {manifest.key_id} is not trusted")
    try:
        public_key.verify(manifest.signature, canonical_bytes(obj))
    except InvalidSignature:
        raise ManifestRejected("bad-signature", f"signature does not match key "
                               f"{manifest.key_id}") from None
    if manifest.device_id != device_id:
        raise ManifestRejected("wrong-device", f"issued for {manifest.device_id!r}")
    if now >= manifest.expires_at:
        raise ManifestRejected("expired", f"expired at {manifest.expires_at:.0f}, now {now:.0f}")
    if manifest.variant_kind is VariantKind.UNKNOWN or manifest.file_format is FileFormat.UNKNOWN:
        raise ManifestRejected("unsupported", "unknown variant kind or file format")
    return manifest


# --- key material as bytes; files are the caller's business --------------------------------------

def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def private_key_from_pem(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise DecodeError("signing key", "$", "an ed25519 private key", type(key).__name__)
    return key


def public_key_to_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_from_pem(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise DecodeError("public key", "$", "an ed25519 public key", type(key).__name__)
    return key
