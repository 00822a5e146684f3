"""The keys a device trusts (agent.trust.TrustStore), on real files: rooted in the enrollment
bundle's key chain it follows rotations and keeps the newest list it accepted across restarts;
a damaged or stale stored list gives way to the bundle; without a root file it reads static
*.pem keys from a folder."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.trust import STATE_FILE, StoredTrust, TrustStore
from edgefleet.contract import ContractError
from edgefleet.contract.errors import DecodeError
from edgefleet.contract.keylist import (
    KeyList,
    KeyListRejected,
    encode_chain,
    sign_key_list,
    trusted_key,
)
from edgefleet.contract.signing import generate_private_key, key_id, public_key_to_pem

K = [generate_private_key() for _ in range(5)]


def kid(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key())


def rotation(n: int, signers: list[Ed25519PrivateKey] | None = None) -> bytes:
    """List version n + 1: K[n] active, K[0..n-1] retired, signed by K[n-1] and K[n]."""
    unsigned = KeyList(version=n + 1, issued_at=1_795_000_000.0 + n,
                       keys=(trusted_key(K[n].public_key()),),
                       retired=tuple(sorted(kid(k) for k in K[:n])))
    default = [K[n - 1], K[n]] if n else [K[0]]
    return sign_key_list(unsigned, default if signers is None else signers)


def chain(*versions: int) -> bytes:
    return encode_chain([rotation(v - 1) for v in versions])


@pytest.fixture
def state(tmp_path: Path) -> Path:
    folder = tmp_path / "state"
    folder.mkdir()
    return folder


@pytest.fixture
def root_file(tmp_path: Path) -> Path:
    path = tmp_path / "bundle" / "key-chain.json"
    path.parent.mkdir()
    path.write_bytes(chain(1))
    return path


def store(root_file: Path | None, state: Path, keys_dir: Path | None = None) -> TrustStore:
    return TrustStore(keys_dir=keys_dir or state.parent / "no-keys", root_file=root_file,
                      state_dir=state)


# --- rooted in the bundle's chain --------------------------------------------------------------

def test_a_fresh_device_trusts_the_bundles_list(root_file: Path, state: Path) -> None:
    trust = store(root_file, state)

    assert trust.rotating
    assert trust.version == 1
    assert set(trust.keys()) == {kid(K[0])}
    assert trust.retired() == frozenset()
    assert not (state / STATE_FILE).exists()


def test_a_bundle_written_after_rotations_starts_at_its_newest_list(root_file: Path,
                                                                    state: Path) -> None:
    root_file.write_bytes(chain(1, 2, 3))

    trust = store(root_file, state)

    assert trust.version == 3
    assert set(trust.keys()) == {kid(K[2])}
    assert trust.retired() == {kid(K[0]), kid(K[1])}


def test_a_rotation_is_followed_and_kept_across_a_restart(root_file: Path,
                                                          state: Path) -> None:
    trust = store(root_file, state)

    result = trust.apply_chain(chain(1, 2))

    assert result is not None and (result.accepted, result.stopped) == ((2,), None)
    assert trust.version == 2
    assert set(trust.keys()) == {kid(K[1])}
    assert trust.retired() == {kid(K[0])}
    saved = state / STATE_FILE
    assert saved.stat().st_mode & 0o777 == 0o600
    assert stored_version(saved) == 2
    restarted = store(root_file, state)
    assert (restarted.version, set(restarted.keys())) == (2, {kid(K[1])})
    assert restarted.retired() == {kid(K[0])}


def test_a_device_offline_through_rotations_catches_up_from_the_retained_chain(
        root_file: Path, state: Path) -> None:
    trust = store(root_file, state)

    result = trust.apply_chain(chain(4, 2, 1, 3))

    assert result is not None and result.accepted == (2, 3, 4)
    assert set(trust.keys()) == {kid(K[3])}
    assert stored_version(state / STATE_FILE) == 4


def test_a_replayed_chain_changes_nothing_and_writes_nothing(root_file: Path,
                                                            state: Path) -> None:
    trust = store(root_file, state)
    trust.apply_chain(chain(1, 2))
    saved = (state / STATE_FILE).read_bytes()
    (state / STATE_FILE).chmod(0o400)                   # a rewrite would have to replace it

    result = trust.apply_chain(chain(1, 2))

    assert result is not None and (result.accepted, result.stopped) == ((), None)
    assert (state / STATE_FILE).read_bytes() == saved
    assert (state / STATE_FILE).stat().st_mode & 0o777 == 0o400
    assert trust.version == 2


@pytest.mark.parametrize(("payload", "reason"), [
    (chain(1) + b"garbage", "malformed"),
    (encode_chain([rotation(1, signers=[K[1]])]), "untrusted"),
    (encode_chain([rotation(1, signers=[K[0]])]), "unsigned"),
], ids=["malformed", "untrusted", "unsigned"])
def test_a_refused_chain_leaves_trust_and_the_state_file_alone(
        root_file: Path, state: Path, payload: bytes, reason: str,
        caplog: pytest.LogCaptureFixture) -> None:
    trust = store(root_file, state)

    with caplog.at_level(logging.WARNING, logger="agent.trust"):
        result = trust.apply_chain(payload)

    assert result is not None and isinstance(result.stopped, KeyListRejected)
    assert result.stopped.reason == reason
    assert (trust.version, set(trust.keys())) == (1, {kid(K[0])})
    assert not (state / STATE_FILE).exists()
    assert "refused a key list" in caplog.text


def test_a_chain_good_up_to_a_bad_list_keeps_the_good_part(root_file: Path,
                                                          state: Path) -> None:
    trust = store(root_file, state)
    bad_v3 = rotation(2, signers=[K[2]])                 # not signed by the trusted K1

    result = trust.apply_chain(encode_chain([rotation(1), bad_v3]))

    assert result is not None and result.accepted == (2,)
    assert result.stopped is not None and result.stopped.reason == "untrusted"
    assert trust.version == 2
    assert stored_version(state / STATE_FILE) == 2


def stored_version(path: Path) -> int:
    """The version of the list the store kept (with the fleet it descends from)."""
    return msgspec.json.decode(path.read_bytes(), type=StoredTrust).list.version


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"version": "two"}', b"\xff\xfe",
                                     b"[]"], ids=["empty", "not-json", "wrong-type",
                                                 "not-utf8", "a-list"])
def test_a_corrupt_state_file_falls_back_to_the_bundles_list(
        root_file: Path, state: Path, content: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    (state / STATE_FILE).write_bytes(content)

    with caplog.at_level(logging.ERROR, logger="agent.trust"):
        trust = store(root_file, state)

    assert (trust.version, set(trust.keys())) == (1, {kid(K[0])})
    assert STATE_FILE in caplog.text
    # And the next chain brings it forward again, replacing the damaged file.
    trust.apply_chain(chain(1, 2, 3))
    assert stored_version(state / STATE_FILE) == 3


def test_a_stored_list_older_than_the_bundle_gives_way_to_the_bundle(root_file: Path,
                                                                    state: Path) -> None:
    store(root_file, state).apply_chain(chain(1, 2))
    root_file.write_bytes(chain(1, 2, 3))              # re-enrolled after another rotation

    trust = store(root_file, state)

    assert trust.version == 3
    assert set(trust.keys()) == {kid(K[2])}


def test_a_stored_list_from_another_fleet_does_not_override_a_new_bundle(
        root_file: Path, state: Path) -> None:
    store(root_file, state).apply_chain(chain(1, 2, 3))      # fleet A, rotated twice
    # Re-enrolled into fleet B (a new controller home: its own first key), with the state
    # folder kept. Fleet A's list is newer by number but does not descend from B's root: the
    # device must trust what its bundle says, not the keys of a fleet it has left.
    fleet_b = generate_private_key()
    root_file.write_bytes(sign_key_list(KeyList(
        version=1, issued_at=1_796_000_000.0, keys=(trusted_key(fleet_b.public_key()),)),
        [fleet_b]))

    trust = store(root_file, state)

    assert set(trust.keys()) == {kid(fleet_b)}
    assert trust.version == 1


def test_the_root_file_is_required_readable_and_well_formed(tmp_path: Path,
                                                            state: Path) -> None:
    with pytest.raises(ContractError, match=r"trust\.root_file"):
        store(tmp_path / "missing.json", state)
    (tmp_path / "bad.json").write_bytes(b"{not json")
    with pytest.raises(DecodeError):
        store(tmp_path / "bad.json", state)
    (tmp_path / "forged.json").write_bytes(encode_chain([rotation(1, signers=[K[0]])]))
    with pytest.raises(KeyListRejected):
        store(tmp_path / "forged.json", state)


# --- static keys, no rotation ------------------------------------------------------------------

def test_without_a_root_file_the_pem_keys_in_the_folder_are_trusted(tmp_path: Path,
                                                                    state: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "fleet.pem").write_bytes(public_key_to_pem(K[0].public_key()))
    (keys_dir / "notes.txt").write_text("not a key")
    (keys_dir / "broken.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n")
    trust = store(None, state, keys_dir)

    assert not trust.rotating
    assert trust.version is None
    assert set(trust.keys()) == {kid(K[0])}
    assert trust.retired() == frozenset()
    assert trust.apply_chain(chain(1, 2)) is None
    assert set(trust.keys()) == {kid(K[0])}
    assert not (state / STATE_FILE).exists()

    # Read on each verification: a key an operator adds counts at once.
    (keys_dir / "second.pem").write_bytes(public_key_to_pem(K[1].public_key()))
    assert set(trust.keys()) == {kid(K[0]), kid(K[1])}


def test_without_a_root_file_or_keys_folder_nothing_is_trusted(tmp_path: Path,
                                                               state: Path) -> None:
    trust = store(None, state, tmp_path / "absent")

    assert trust.keys() == {}


def test_a_stored_list_is_ignored_without_a_root_file(tmp_path: Path, root_file: Path,
                                                      state: Path) -> None:
    store(root_file, state).apply_chain(chain(1, 2))

    trust = store(None, state, tmp_path / "absent")

    assert (trust.version, trust.keys()) == (None, {})
