"""Rotating the manifest signing key: signed, versioned lists of trusted keys (after TUF's root).

A `KeyList` names the keys that may sign manifests now and the ids of keys retired before. A
device starts from the list in its enrollment bundle and accepts a newer list only when a key it
already trusts signed it, and every key the new list adds signed it too (so nobody adds a key
they do not hold). Lists are walked in version order, so a device that was offline through
several rotations catches up from the whole chain, which the controller keeps retained on
``{root}/fleet/keys``. A key once retired never comes back, and a manifest it signed is refused.

Pure: values in, values out; the caller stores the accepted list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.contract.errors import ContractError, DecodeError
from edgefleet.contract.signing import key_id

DOMAIN = b"edgefleet-keylist-v1\n"
VERSION = 1


class KeyListRejected(ContractError):
    """A key list (or chain) that may not change what this device trusts."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__("KeyList", "$", f"a key list that passes '{reason}'", detail)


class TrustedKey(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    ed25519: bytes                      # the raw 32-byte public key (base64 in JSON)


class KeySignature(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    signature: bytes


class KeyList(msgspec.Struct, frozen=True, kw_only=True):
    v: int = VERSION
    version: int                        # 1 for the fleet's first key, +1 per rotation
    issued_at: float
    keys: tuple[TrustedKey, ...]        # may sign manifests now
    retired: tuple[str, ...] = ()       # key ids that never again may
    signatures: tuple[KeySignature, ...] = ()

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return {k.key_id: Ed25519PublicKey.from_public_bytes(k.ed25519) for k in self.keys}


@dataclass(frozen=True)
class Advance:
    """What applying a chain did: the list now trusted, which versions it moved through, and
    why it stopped early (None when every newer list was accepted)."""

    current: KeyList
    accepted: tuple[int, ...]
    stopped: KeyListRejected | None = None


def trusted_key(public_key: Ed25519PublicKey) -> TrustedKey:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return TrustedKey(key_id=key_id(public_key), ed25519=raw)


def _canonical(obj: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in obj.items() if k != "signatures"}
    return DOMAIN + msgspec.json.encode(body, order="sorted")


def sign_key_list(unsigned: KeyList, signers: Sequence[Ed25519PrivateKey]) -> bytes:
    """The list with one signature per signer, as wire bytes (a JSON object)."""
    body = msgspec.to_builtins(msgspec.structs.replace(unsigned, signatures=()))
    signatures = tuple(KeySignature(key_id=key_id(k.public_key()), signature=k.sign(
        _canonical(body))) for k in signers)
    return msgspec.json.encode(msgspec.structs.replace(unsigned, signatures=signatures))


def encode_chain(lists: Sequence[bytes]) -> bytes:
    """The retained chain: a JSON array of signed lists, each exactly as signed."""
    return b"[" + b",".join(lists) + b"]"


def _parse(obj: Any, what: str) -> KeyList:
    try:
        key_list = msgspec.convert(obj, KeyList)
        for key in key_list.keys:
            public = Ed25519PublicKey.from_public_bytes(key.ed25519)
            if key_id(public) != key.key_id:
                raise DecodeError(what, "$.keys", "key ids that match their keys", key.key_id)
    except msgspec.ValidationError as exc:
        raise DecodeError(what, "$", "a key list", str(exc)) from None
    except ValueError as exc:
        if isinstance(exc, ContractError):
            raise
        raise DecodeError(what, "$.keys", "32-byte ed25519 public keys", str(exc)) from None
    if key_list.v > VERSION:
        raise DecodeError(what, "$.v", f"a key list version up to {VERSION}", str(key_list.v))
    return key_list


def _objects(payload: bytes, what: str) -> list[Any]:
    try:
        value = msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(what, "$", "JSON", f"malformed payload ({exc})") from None
    return value if isinstance(value, list) else [value]


def _signed_by(obj: Mapping[str, Any], key_list: KeyList,
               keys: Mapping[str, Ed25519PublicKey]) -> set[str]:
    """The ids in `keys` whose signature on this list verifies."""
    message = _canonical(obj)
    valid = set()
    for sig in key_list.signatures:
        key = keys.get(sig.key_id)
        if key is None:
            continue
        try:
            key.verify(sig.signature, message)
        except InvalidSignature:
            continue
        valid.add(sig.key_id)
    return valid


def load_root(payload: bytes) -> KeyList:
    """The list a device starts from: its enrollment bundle's chain. The first list is trusted
    because of where it came from (we still check every key it names signed it); the rest must
    follow from it as any later rotation would."""
    objects = [o for o in _objects(payload, "KeyList") if isinstance(o, dict)]
    if not objects:
        raise DecodeError("KeyList", "$", "a key list or a chain of them", "nothing usable")
    lists = sorted(((_parse(o, "KeyList"), o) for o in objects), key=lambda p: p[0].version)
    root, obj = lists[0]
    if not root.keys:
        raise KeyListRejected("no-keys", f"version {root.version} names no key")
    missing = set(root.public_keys()) - _signed_by(obj, root, root.public_keys())
    if missing:
        raise KeyListRejected("unsigned", f"keys {sorted(missing)} did not sign version "
                              f"{root.version}")
    result = advance(root, payload)
    if result.stopped is not None:
        raise result.stopped
    return result.current


def chain_origin(payload: bytes) -> str:
    """Which fleet a chain belongs to: a digest of its first list. Two bundles of one fleet
    share it; a device re-enrolled into another fleet sees it change."""
    objects = [o for o in _objects(payload, "KeyList") if isinstance(o, dict)]
    if not objects:
        raise DecodeError("KeyList", "$", "a key list or a chain of them", "nothing usable")
    first = min(objects, key=lambda o: _parse(o, "KeyList").version)
    return hashlib.sha256(_canonical(first)).hexdigest()[:16]


def read_list(payload: bytes) -> KeyList:
    """A list this side accepted and stored itself: parsed, not re-verified."""
    return _parse(msgspec.json.decode(payload), "KeyList")


def advance(current: KeyList, chain: bytes) -> Advance:
    """Applies every list in the chain newer than `current`, in version order, each checked
    against the list before it. Older lists and the current one are ignored (a retained or
    replayed chain is harmless). Stops at the first list that fails, keeping what it accepted.
    """
    try:
        objects = _objects(chain, "KeyChain")
        candidates = sorted(((_parse(o, "KeyChain"), o) for o in objects
                             if isinstance(o, dict)), key=lambda pair: pair[0].version)
    except DecodeError as exc:
        return Advance(current, (), KeyListRejected("malformed", str(exc)))
    accepted: list[int] = []
    for candidate, obj in candidates:
        if candidate.version <= current.version:
            continue
        problem = _check_successor(current, candidate, obj)
        if problem is not None:
            return Advance(current, tuple(accepted), problem)
        current = candidate
        accepted.append(candidate.version)
    return Advance(current, tuple(accepted))


def _check_successor(current: KeyList, candidate: KeyList,
                     obj: Mapping[str, Any]) -> KeyListRejected | None:
    version = candidate.version
    if not candidate.keys:
        return KeyListRejected("no-keys", f"version {version} names no key")
    gone = set(current.retired) - set(candidate.retired)
    if gone:
        return KeyListRejected("unretired", f"version {version} forgets retired keys "
                               f"{sorted(gone)}")
    back = set(candidate.public_keys()) & set(current.retired)
    if back:
        return KeyListRejected("retired-key", f"version {version} trusts retired keys "
                               f"{sorted(back)} again")
    if not _signed_by(obj, candidate, current.public_keys()):
        return KeyListRejected("untrusted", f"version {version} is not signed by any key "
                               f"trusted now ({', '.join(sorted(current.public_keys()))})")
    added = set(candidate.public_keys()) - set(current.public_keys())
    missing = added - _signed_by(obj, candidate, candidate.public_keys())
    if missing:
        return KeyListRejected("unsigned", f"new keys {sorted(missing)} did not sign version "
                               f"{version}")
    return None
