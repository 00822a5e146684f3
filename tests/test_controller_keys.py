"""The controller's signing key and its rotation (controller.keys) on a real temp folder: what a
rotation writes, that devices holding any earlier list accept it, a rotation cut short between
its two writes finished (or undone) by the next load, and homes from before key lists."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from controller.keys import (
    KEY_CHAIN,
    NEXT_KEY,
    PUBLIC_KEY,
    SIGNING_KEY,
    SigningKeyError,
    chain_payload,
    create_signing_key,
    current_key_list,
    key_chain,
    load_signing_key,
    rotate_signing_key,
)
from edgefleet.contract.keylist import (
    KeyList,
    advance,
    encode_chain,
    load_root,
    read_list,
    sign_key_list,
    trusted_key,
)
from edgefleet.contract.signing import (
    generate_private_key,
    key_id,
    private_key_to_pem,
    public_key_from_pem,
)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    create_signing_key(directory)
    return directory


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def public_id(directory: Path) -> str:
    return key_id(public_key_from_pem((directory / PUBLIC_KEY).read_bytes()))


def write_key(path: Path, key: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_to_pem(key))  # type: ignore[arg-type]


# --- creating --------------------------------------------------------------------------------

def test_create_writes_a_private_key_its_public_half_and_key_list_version_1(keys: Path) -> None:
    key = load_signing_key(keys)

    assert mode(keys) == 0o700
    assert mode(keys / SIGNING_KEY) == 0o600
    assert public_id(keys) == key.key_id
    chain = key_chain(keys)
    assert len(chain) == 1
    first = load_root(chain[0])
    assert (first.version, first.retired) == (1, ())
    assert set(first.public_keys()) == {key.key_id}
    assert [s.key_id for s in first.signatures] == [key.key_id]
    assert current_key_list(keys) == first


def test_create_refuses_to_replace_a_signing_key(keys: Path) -> None:
    before = (keys / SIGNING_KEY).read_bytes(), (keys / KEY_CHAIN).read_bytes()

    with pytest.raises(SigningKeyError, match="refusing to replace"):
        create_signing_key(keys)

    assert ((keys / SIGNING_KEY).read_bytes(), (keys / KEY_CHAIN).read_bytes()) == before


def test_load_without_a_key_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="edgefleet init"):
        load_signing_key(tmp_path)


def test_load_refuses_a_key_others_can_read(keys: Path) -> None:
    (keys / SIGNING_KEY).chmod(0o640)

    with pytest.raises(SigningKeyError, match="chmod 600"):
        load_signing_key(keys)


# --- rotating --------------------------------------------------------------------------------

def test_a_rotation_writes_the_next_version_retiring_the_old_key(keys: Path) -> None:
    old = load_signing_key(keys)
    old_pem = (keys / SIGNING_KEY).read_bytes()

    rotation = rotate_signing_key(keys)

    new = load_signing_key(keys)
    assert (rotation.retired, rotation.active, rotation.version) == (old.key_id, new.key_id, 2)
    assert new.key_id != old.key_id
    assert (keys / SIGNING_KEY).read_bytes() != old_pem
    assert mode(keys / SIGNING_KEY) == 0o600
    assert public_id(keys) == new.key_id
    assert not (keys / NEXT_KEY).exists()
    newest = current_key_list(keys)
    assert newest.version == 2
    assert set(newest.public_keys()) == {new.key_id}
    assert newest.retired == (old.key_id,)
    assert {s.key_id for s in newest.signatures} == {old.key_id, new.key_id}


def test_a_device_holding_the_previous_list_accepts_the_rotation(keys: Path) -> None:
    before = current_key_list(keys)

    rotate_signing_key(keys)

    result = advance(before, chain_payload(keys))
    assert (result.accepted, result.stopped) == ((2,), None)
    assert result.current == current_key_list(keys)


def test_rotating_twice_keeps_every_list_and_retires_both_old_keys(keys: Path) -> None:
    first = load_signing_key(keys).key_id
    second = rotate_signing_key(keys).active
    third = rotate_signing_key(keys)

    chain = [read_list(payload) for payload in key_chain(keys)]
    assert [k.version for k in chain] == [1, 2, 3]
    assert third.retired == second
    assert set(chain[-1].retired) == {first, second}
    assert set(chain[-1].public_keys()) == {third.active} == {load_signing_key(keys).key_id}
    # A device enrolled before both rotations catches up from the published chain.
    result = advance(load_root(key_chain(keys)[0]), chain_payload(keys))
    assert (result.accepted, result.stopped) == ((2, 3), None)
    # And a bundle written now roots a new device at version 3.
    assert load_root(chain_payload(keys)).version == 3


def test_the_chain_keeps_each_list_exactly_as_signed(keys: Path) -> None:
    rotate_signing_key(keys)
    on_disk = msgspec.json.decode((keys / KEY_CHAIN).read_bytes())

    assert [msgspec.json.decode(p) for p in key_chain(keys)] == on_disk
    assert chain_payload(keys) == encode_chain(key_chain(keys))


# --- a rotation cut short ----------------------------------------------------------------------

def _interrupted_rotation(keys: Path, *, list_written: bool) -> str:
    """What `rotate_signing_key` leaves when killed after writing the next key (and, with
    `list_written`, the new list too) but before moving the key into place."""
    old = load_signing_key(keys)
    current = current_key_list(keys)
    new = generate_private_key()
    write_key(keys / NEXT_KEY, new)
    if list_written:
        successor = KeyList(version=current.version + 1, issued_at=1.0,
                            keys=(trusted_key(new.public_key()),), retired=(old.key_id,))
        lists = [msgspec.json.decode(p) for p in key_chain(keys)]
        lists.append(msgspec.json.decode(sign_key_list(successor, [old.private, new])))
        (keys / KEY_CHAIN).write_bytes(msgspec.json.encode(lists))
    return key_id(new.public_key())


def test_a_rotation_cut_short_after_its_list_is_finished_by_the_next_load(keys: Path) -> None:
    new_id = _interrupted_rotation(keys, list_written=True)

    key = load_signing_key(keys)

    assert key.key_id == new_id
    assert public_id(keys) == new_id
    assert not (keys / NEXT_KEY).exists()
    assert mode(keys / SIGNING_KEY) == 0o600
    assert current_key_list(keys).version == 2


def test_a_rotation_cut_short_before_its_list_is_undone_by_the_next_load(keys: Path) -> None:
    old = load_signing_key(keys)
    old_pem = (keys / SIGNING_KEY).read_bytes()
    _interrupted_rotation(keys, list_written=False)

    key = load_signing_key(keys)

    assert key.key_id == old.key_id
    assert (keys / SIGNING_KEY).read_bytes() == old_pem
    assert not (keys / NEXT_KEY).exists()
    assert current_key_list(keys).version == 1


@pytest.mark.parametrize("list_written", [True, False])
def test_a_rotation_after_one_cut_short_works(keys: Path, list_written: bool) -> None:
    _interrupted_rotation(keys, list_written=list_written)
    before = current_key_list(keys)

    rotation = rotate_signing_key(keys)

    assert rotation.version == before.version + 1
    assert load_signing_key(keys).key_id == rotation.active
    result = advance(load_root(key_chain(keys)[0]), chain_payload(keys))
    assert result.stopped is None and result.current.version == rotation.version


def test_load_refuses_a_key_the_newest_list_does_not_trust(keys: Path) -> None:
    trusted = load_signing_key(keys).key_id
    (keys / SIGNING_KEY).unlink()
    stranger = generate_private_key()
    write_key(keys / SIGNING_KEY, stranger)

    with pytest.raises(SigningKeyError) as caught:
        load_signing_key(keys)

    assert key_id(stranger.public_key()) in str(caught.value)
    assert trusted in str(caught.value)


def test_load_refuses_the_old_key_put_back_after_a_rotation(keys: Path) -> None:
    old_pem = (keys / SIGNING_KEY).read_bytes()
    rotate_signing_key(keys)
    (keys / SIGNING_KEY).write_bytes(old_pem)             # restored from an old backup

    with pytest.raises(SigningKeyError, match="does not trust"):
        load_signing_key(keys)


def test_a_home_from_before_key_lists_gets_version_1_on_load(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    key = generate_private_key()
    write_key(keys / SIGNING_KEY, key)

    loaded = load_signing_key(keys)

    assert loaded.key_id == key_id(key.public_key())
    first = current_key_list(keys)
    assert (first.version, set(first.public_keys())) == (1, {loaded.key_id})
    assert len(key_chain(keys)) == 1
    assert load_signing_key(keys).key_id == loaded.key_id      # and only once
    assert len(key_chain(keys)) == 1


def test_an_empty_folder_has_no_chain(tmp_path: Path) -> None:
    assert key_chain(tmp_path) == []
    with pytest.raises(SigningKeyError, match="edgefleet init"):
        current_key_list(tmp_path)
