"""Key lists for signing-key rotation (edgefleet.contract.keylist), as pure tables: which successor
a device accepts and why it refuses the others, a device catching up across several rotations
from a chain in any order, replays that change nothing, and malformed bytes that end as a refusal
(or a DecodeError at enrollment), never as another exception."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract import ManifestRejected
from edgefleet.contract.errors import ContractError, DecodeError
from edgefleet.contract.keylist import (
    Advance,
    KeyList,
    KeyListRejected,
    advance,
    encode_chain,
    load_root,
    read_list,
    sign_key_list,
    trusted_key,
)
from edgefleet.contract.signing import generate_private_key, key_id, sign_manifest, verify_manifest
from tests.contract_examples import MANIFEST, T0

# K[0] is the fleet's first key; rotation n (list version n + 1) retires K[n - 1] for K[n].
K = [generate_private_key() for _ in range(8)]
STRANGER = generate_private_key()
ROTATIONS = 5


def kid(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key())


def key_list(version: int, active: Sequence[Ed25519PrivateKey],
             retired: Sequence[Ed25519PrivateKey] = (),
             signers: Sequence[Ed25519PrivateKey] | None = None) -> bytes:
    """A signed list; by default signed by the keys it names."""
    unsigned = KeyList(version=version, issued_at=T0 + version,
                       keys=tuple(trusted_key(k.public_key()) for k in active),
                       retired=tuple(sorted(kid(k) for k in retired)))
    return sign_key_list(unsigned, active if signers is None else signers)


def rotation(n: int) -> bytes:
    """Version n + 1 as `edgefleet keys rotate` writes it: signed by the old key and the new."""
    if n == 0:
        return key_list(1, [K[0]])
    return key_list(n + 1, [K[n]], retired=K[:n], signers=[K[n - 1], K[n]])


CHAIN = [rotation(n) for n in range(ROTATIONS + 1)]    # versions 1..6
V1 = load_root(CHAIN[0])
V2 = load_root(encode_chain(CHAIN[:2]))


def reason(result: Advance) -> str | None:
    return result.stopped.reason if result.stopped is not None else None


# --- one successor at a time -------------------------------------------------------------------

# (name, the list offered to a device that trusts version 1 (K0), what happens)
FROM_V1 = [
    ("rotation signed by the trusted key and the new one", rotation(1), None),
    ("key added, none retired, both signed", key_list(2, [K[0], K[1]]), None),
    ("same key, new version, signed by it", key_list(2, [K[0]]), None),
    ("signed only by the new key", key_list(2, [K[1]], [K[0]], signers=[K[1]]), "untrusted"),
    ("signed by a stranger and the new key", key_list(2, [K[1]], [K[0]],
                                                      signers=[STRANGER, K[1]]), "untrusted"),
    ("signed by nobody", key_list(2, [K[1]], [K[0]], signers=[]), "untrusted"),
    ("new key did not sign", key_list(2, [K[1]], [K[0]], signers=[K[0]]), "unsigned"),
    ("one of two new keys did not sign", key_list(2, [K[1], K[2]], [K[0]],
                                                  signers=[K[0], K[1]]), "unsigned"),
    ("names no key", key_list(2, [], [K[0]], signers=[K[0]]), "no-keys"),
]


@pytest.mark.parametrize(("offered", "expected"), [pytest.param(o, e, id=n) for n, o, e in FROM_V1])
def test_a_successor_of_version_1_is_accepted_only_when_trusted_and_signed_by_its_new_keys(
        offered: bytes, expected: str | None) -> None:
    result = advance(V1, offered)

    assert reason(result) == expected
    if expected is None:
        assert result.accepted == (2,)
        assert result.current == read_list(offered)
    else:
        assert (result.current, result.accepted) == (V1, ())
        assert isinstance(result.stopped, KeyListRejected)


# (name, the list offered to a device at version 2 (K1 active, K0 retired), what happens)
FROM_V2 = [
    ("next rotation", rotation(2), None),
    ("retired key comes back", key_list(3, [K[0], K[2]], [K[0], K[1]],
                                        signers=[K[0], K[1], K[2]]), "retired-key"),
    ("retired key comes back alone", key_list(3, [K[0]], [K[0]], signers=[K[0], K[1]]),
     "retired-key"),
    ("retired id dropped", key_list(3, [K[2]], [K[1]], signers=[K[1], K[2]]), "unretired"),
    ("retired id dropped to bring it back", key_list(3, [K[0]], [], signers=[K[0], K[1]]),
     "unretired"),
    ("signed by the retired key instead of the active one",
     key_list(3, [K[2]], [K[0], K[1]], signers=[K[0], K[2]]), "untrusted"),
]


@pytest.mark.parametrize(("offered", "expected"), [pytest.param(o, e, id=n) for n, o, e in FROM_V2])
def test_a_retired_key_never_comes_back_and_a_retired_id_is_never_forgotten(
        offered: bytes, expected: str | None) -> None:
    result = advance(V2, offered)

    assert reason(result) == expected
    assert result.current.version == (3 if expected is None else 2)


def test_a_list_changed_after_signing_is_untrusted() -> None:
    obj = msgspec.json.decode(rotation(1))
    obj["retired"] = []                                  # keep K0 trusted behind the signers' back
    obj["keys"].append(msgspec.to_builtins(trusted_key(STRANGER.public_key())))

    assert reason(advance(V1, msgspec.json.encode(obj))) == "untrusted"


def test_signatures_copied_from_another_list_do_not_verify() -> None:
    forged = msgspec.json.decode(key_list(2, [STRANGER], [K[0]], signers=[STRANGER]))
    forged["signatures"] += msgspec.json.decode(rotation(1))["signatures"]

    assert reason(advance(V1, msgspec.json.encode(forged))) == "untrusted"


def test_an_accepted_list_round_trips_through_storage() -> None:
    current = advance(V1, rotation(1)).current

    assert read_list(msgspec.json.encode(current)) == current
    assert set(current.public_keys()) == {kid(K[1])}
    assert current.retired == (kid(K[0]),)


# --- chains --------------------------------------------------------------------------------------

def test_a_device_offline_through_two_rotations_catches_up_in_one_call() -> None:
    result = advance(V1, encode_chain(CHAIN[:3]))

    assert (result.accepted, result.stopped) == ((2, 3), None)
    assert set(result.current.public_keys()) == {kid(K[2])}
    assert set(result.current.retired) == {kid(K[0]), kid(K[1])}


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(range(len(CHAIN))), start=st.integers(1, ROTATIONS + 1))
def test_the_chain_is_applied_in_version_order_whatever_its_order_on_the_wire(
        order: list[int], start: int) -> None:
    current = load_root(encode_chain(CHAIN[:start]))
    result = advance(current, encode_chain([CHAIN[i] for i in order]))

    assert result.stopped is None
    assert result.accepted == tuple(range(start + 1, ROTATIONS + 2))
    assert result.current == read_list(CHAIN[-1])


@settings(max_examples=20, deadline=None)
@given(extra=st.lists(st.sampled_from(CHAIN), max_size=8))
def test_duplicated_and_replayed_lists_change_nothing_once_applied(extra: list[bytes]) -> None:
    newest = load_root(encode_chain(CHAIN))
    result = advance(newest, encode_chain([*CHAIN, *extra]))

    assert result == Advance(newest, ())


@pytest.mark.parametrize("start", range(1, ROTATIONS + 2))
def test_older_and_equal_versions_are_ignored(start: int) -> None:
    current = load_root(encode_chain(CHAIN[:start]))

    result = advance(current, encode_chain(CHAIN[:start]))

    assert result == Advance(current, ())


def test_a_bad_list_in_the_middle_stops_there_and_keeps_what_came_before() -> None:
    bad_v3 = key_list(3, [K[2]], [K[0], K[1]], signers=[K[1]])        # new key did not sign
    v4 = key_list(4, [K[3]], [K[0], K[1], K[2]], signers=[K[2], K[3]])

    result = advance(V1, encode_chain([v4, bad_v3, CHAIN[1]]))

    assert result.accepted == (2,)
    assert result.current == V2
    assert reason(result) == "unsigned"
    assert "version 3" in str(result.stopped)


def test_a_replayed_old_chain_cannot_roll_a_device_back() -> None:
    newest = load_root(encode_chain(CHAIN))
    # An attacker's fork from version 1, signed by K0 (which they might hold after it retired).
    fork = key_list(2, [K[0], STRANGER], signers=[K[0], STRANGER])

    result = advance(newest, encode_chain([CHAIN[0], fork]))

    assert result == Advance(newest, ())


def test_elements_that_are_not_objects_are_skipped() -> None:
    chain = b'[1, "x", null, [], ' + rotation(1) + b"]"

    assert advance(V1, chain).accepted == (2,)


# --- load_root: the enrollment bundle's chain ----------------------------------------------------

def test_load_root_of_a_single_list_trusts_it() -> None:
    assert load_root(CHAIN[0]) == read_list(CHAIN[0])
    assert V1.version == 1 and set(V1.public_keys()) == {kid(K[0])}


@pytest.mark.parametrize("order", [lambda c: c, lambda c: c[::-1], lambda c: c[2:] + c[:2]],
                         ids=["oldest-first", "newest-first", "rotated"])
def test_load_root_of_a_chain_walks_it_from_its_oldest_list(order: object) -> None:
    chain = order(CHAIN)  # type: ignore[operator]

    assert load_root(encode_chain(chain)) == read_list(CHAIN[-1])


@pytest.mark.parametrize(("root", "expected"), [
    (key_list(1, [K[0], K[1]], signers=[K[0]]), "unsigned"),
    (key_list(1, [], signers=[K[0]]), "no-keys"),
    (key_list(1, [K[0]], signers=[]), "unsigned"),
], ids=["a-key-did-not-sign", "no-keys", "no-signature"])
def test_load_root_refuses_a_root_whose_keys_did_not_all_sign_it(root: bytes,
                                                                 expected: str) -> None:
    with pytest.raises(KeyListRejected) as caught:
        load_root(root)

    assert caught.value.reason == expected


def test_load_root_raises_the_refusal_of_a_bad_list_in_its_chain() -> None:
    with pytest.raises(KeyListRejected) as caught:
        load_root(encode_chain([CHAIN[0], key_list(2, [K[1]], [K[0]], signers=[K[1]])]))

    assert caught.value.reason == "untrusted"


# --- malformed input ---------------------------------------------------------------------------

def _obj(payload: bytes) -> dict[str, object]:
    obj = msgspec.json.decode(payload)
    assert isinstance(obj, dict)
    return obj


def _with(payload: bytes, **changes: object) -> bytes:
    return msgspec.json.encode({**_obj(payload), **changes})


def _key_changed(**changes: object) -> bytes:
    obj = _obj(rotation(1))
    obj["keys"] = [{**obj["keys"][0], **changes}]  # type: ignore[index]
    return msgspec.json.encode(obj)


MALFORMED = [
    pytest.param(b"", id="empty"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b"not json", id="not-json"),
    pytest.param(rotation(1)[:-5], id="cut-short"),
    pytest.param(_with(rotation(1), version="2"), id="version-as-string"),
    pytest.param(_with(rotation(1), version=2.5), id="version-as-float"),
    pytest.param(_with(rotation(1), keys={}), id="keys-as-object"),
    pytest.param(_with(rotation(1), v=2), id="from-a-newer-format"),
    pytest.param(_key_changed(key_id="0123456789abcdef"), id="key-id-of-another-key"),
    pytest.param(_key_changed(ed25519="AAAA"), id="3-byte-key"),
    pytest.param(_key_changed(ed25519="A" * 42 + "=="), id="31-byte-key"),
    pytest.param(_key_changed(ed25519="not base64!"), id="not-base64"),
    pytest.param(_with(rotation(1), signatures=[{"key_id": kid(K[0])}]), id="signature-missing"),
    pytest.param(b'{"version": 2, "issued_at": 1e999, "keys": []}', id="number-out-of-range"),
]


@pytest.mark.parametrize("payload", MALFORMED)
def test_a_malformed_chain_stops_as_malformed_and_changes_nothing(payload: bytes) -> None:
    result = advance(V1, payload)

    assert (result.current, result.accepted, reason(result)) == (V1, (), "malformed")


@pytest.mark.parametrize("payload", MALFORMED)
def test_a_malformed_root_raises_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        load_root(payload)


def test_one_malformed_list_refuses_the_whole_chain() -> None:
    chain = encode_chain([CHAIN[0], CHAIN[1], _key_changed(ed25519="AAAA")])

    assert (advance(V1, chain).accepted, reason(advance(V1, chain))) == ((), "malformed")


@pytest.mark.parametrize("payload", [b"[]", b"5", b'"keys"', b"null", b"[1, 2]"])
def test_a_root_with_no_list_in_it_raises_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError, match="nothing usable"):
        load_root(payload)


# Bytes a broker will deliver on the retained keys topic (up to its 256 KiB message limit).
HOSTILE = [
    pytest.param(rotation(1).replace(kid(K[1]).encode(), b"\xff" + kid(K[1])[1:].encode()),
                 id="invalid-utf8-in-a-key-id"),
    pytest.param(b'["\xff"]', id="invalid-utf8-string"),
    pytest.param(b"[" * 100_000, id="deeply-nested"),
]


@pytest.mark.parametrize("payload", HOSTILE)
def test_hostile_bytes_on_the_keys_topic_end_as_a_malformed_refusal(payload: bytes) -> None:
    result = advance(V1, payload)

    assert (result.current, result.accepted, reason(result)) == (V1, (), "malformed")


@pytest.mark.parametrize("payload", HOSTILE)
def test_a_hostile_root_raises_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        load_root(payload)


_PRINTABLE = st.integers(0x20, 0x7E)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_mangled_chain_never_raises_and_never_trusts_a_new_key(data: st.DataObject) -> None:
    chain = bytearray(encode_chain(CHAIN[:3]))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(chain) - 1))
        action = data.draw(st.sampled_from(["set", "cut", "insert"]))
        if action == "set":
            chain[at] = data.draw(_PRINTABLE)
        elif action == "cut":
            del chain[at:at + data.draw(st.integers(1, 40))]
        else:
            chain[at:at] = bytes([data.draw(_PRINTABLE)])
    payload = bytes(chain)

    result = advance(V1, payload)
    assert result.stopped is None or isinstance(result.stopped, KeyListRejected)
    # Whatever survived still verifies: every key now trusted was in a genuine list.
    genuine = {kid(k) for k in K[:3]}
    assert set(result.current.public_keys()) <= genuine
    try:
        root = load_root(payload)
    except ContractError:
        return
    assert set(root.public_keys()) <= genuine


# --- manifests signed by a retired key -----------------------------------------------------------

def _verify(payload: bytes, current: KeyList) -> object:
    return verify_manifest(payload, current.public_keys(), device_id=MANIFEST.device_id,
                           now=T0 + 60, retired=current.retired)


def test_a_manifest_signed_by_a_retired_key_is_rejected_as_retired_key() -> None:
    with pytest.raises(ManifestRejected) as caught:
        _verify(sign_manifest(MANIFEST, K[0]), V2)

    assert caught.value.reason == "retired-key"


def test_without_the_retired_ids_the_same_manifest_is_an_unknown_key() -> None:
    with pytest.raises(ManifestRejected) as caught:
        verify_manifest(sign_manifest(MANIFEST, K[0]), V2.public_keys(),
                        device_id=MANIFEST.device_id, now=T0 + 60)

    assert caught.value.reason == "unknown-key"


def test_a_manifest_signed_by_the_active_key_verifies_after_rotation() -> None:
    manifest = _verify(sign_manifest(MANIFEST, K[1]), V2)

    assert manifest.key_id == kid(K[1])  # type: ignore[attr-defined]


def test_a_manifest_by_a_key_never_trusted_is_still_an_unknown_key() -> None:
    with pytest.raises(ManifestRejected) as caught:
        _verify(sign_manifest(MANIFEST, STRANGER), V2)

    assert caught.value.reason == "unknown-key"
