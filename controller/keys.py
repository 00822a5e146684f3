"""The fleet's manifest signing key on the controller's disk, and its rotation.

`edgefleet init` creates the key and the first key list (version 1, the devices' root of
trust); `edgefleet keys rotate` makes a new key, writes key list version n+1 naming it and
retiring the old one, signed by both, and only then swaps the key file. A rotation cut short
between the two writes is finished by the next load, so the controller never signs with a key
the newest list retired. The private key is the one thing that can put a model on a device:
mode 0600 in a folder of mode 0700, never overwritten in place.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.files import replace_file, write_private
from edgefleet.contract.keylist import (
    KeyList,
    encode_chain,
    load_root,
    sign_key_list,
    trusted_key,
)
from edgefleet.contract.signing import (
    generate_private_key,
    key_id,
    private_key_from_pem,
    private_key_to_pem,
    public_key_to_pem,
)

SIGNING_KEY = "signing-key.pem"
NEXT_KEY = "signing-key.next.pem"   # exists only inside a rotation
PUBLIC_KEY = "signing-key.pub.pem"
KEY_CHAIN = "key-chain.json"        # every key list ever issued, oldest first


class SigningKeyError(RuntimeError):
    pass


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    key_id: str
    public_pem: bytes


@dataclass(frozen=True)
class Rotation:
    retired: str
    active: str
    version: int






def create_signing_key(directory: Path) -> SigningKey:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / SIGNING_KEY
    if path.exists():
        raise SigningKeyError(f"{path} exists: refusing to replace the fleet's signing key")
    key = generate_private_key()
    write_private(path, private_key_to_pem(key))
    public = public_key_to_pem(key.public_key())
    (directory / PUBLIC_KEY).write_bytes(public)
    _write_first_list(directory, key)
    return SigningKey(key, key_id(key.public_key()), public)


def _write_first_list(directory: Path, key: Ed25519PrivateKey) -> None:
    first = KeyList(version=1, issued_at=time.time(), keys=(trusted_key(key.public_key()),))
    replace_file(directory / KEY_CHAIN, msgspec.json.encode([msgspec.json.decode(
        sign_key_list(first, [key]))]))


def _read_private(path: Path) -> Ed25519PrivateKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SigningKeyError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    return private_key_from_pem(path.read_bytes())


def key_chain(directory: Path) -> list[bytes]:
    """Every signed key list, oldest first, each as the exact bytes that were signed."""
    try:
        raw = msgspec.json.decode((directory / KEY_CHAIN).read_bytes())
    except FileNotFoundError:
        return []
    return [msgspec.json.encode(obj) for obj in raw]


def chain_payload(directory: Path) -> bytes:
    return encode_chain(key_chain(directory))


def current_key_list(directory: Path) -> KeyList:
    chain = key_chain(directory)
    if not chain:
        raise SigningKeyError(f"no key list at {directory / KEY_CHAIN}: run `edgefleet init`")
    return load_root(chain[-1])


def load_signing_key(directory: Path) -> SigningKey:
    path = directory / SIGNING_KEY
    if not path.exists():
        raise SigningKeyError(f"no signing key at {path}: run `edgefleet init` first")
    _finish_rotation(directory)
    key = _read_private(path)
    if not (directory / KEY_CHAIN).exists():
        # A home made before key lists existed: its one key becomes version 1.
        _write_first_list(directory, key)
    active = current_key_list(directory).public_keys()
    if key_id(key.public_key()) not in active:
        raise SigningKeyError(f"{path} holds key {key_id(key.public_key())}, which the newest "
                              f"key list does not trust (it trusts {', '.join(active)})")
    return SigningKey(key, key_id(key.public_key()), public_key_to_pem(key.public_key()))


def rotate_signing_key(directory: Path) -> Rotation:
    old = load_signing_key(directory)
    current = current_key_list(directory)
    new = generate_private_key()
    try:
        write_private(directory / NEXT_KEY, private_key_to_pem(new))
    except FileExistsError:
        raise SigningKeyError(f"{directory / NEXT_KEY} exists: another rotation is running"
                              ) from None
    successor = KeyList(version=current.version + 1, issued_at=time.time(),
                        keys=(trusted_key(new.public_key()),),
                        retired=tuple(sorted({*current.retired, *current.public_keys()})))
    signed = sign_key_list(successor, [old.private, new])
    lists = [msgspec.json.decode(b) for b in key_chain(directory)] + [
        msgspec.json.decode(signed)]
    # The list first, then the key: a crash in between leaves NEXT_KEY, which the next load
    # moves into place (see _finish_rotation).
    replace_file(directory / KEY_CHAIN, msgspec.json.encode(lists))
    _finish_rotation(directory)
    return Rotation(old.key_id, key_id(new.public_key()), successor.version)


def _finish_rotation(directory: Path) -> None:
    pending = directory / NEXT_KEY
    if not pending.exists():
        return
    key = _read_private(pending)
    chain = key_chain(directory)
    if chain and key_id(key.public_key()) in load_root(chain[-1]).public_keys():
        os.replace(pending, directory / SIGNING_KEY)
        replace_file(directory / PUBLIC_KEY, public_key_to_pem(key.public_key()))
    else:
        pending.unlink()     # the rotation died before its list was written: nothing changed
