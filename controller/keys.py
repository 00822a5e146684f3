"""The fleet's manifest signing key on the controller's disk.

`edgefleet init` creates it once; it is the one thing that can put a model on a device, so it
is written with mode 0600 in a directory of mode 0700, and never overwritten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract.signing import (
    generate_private_key,
    key_id,
    private_key_from_pem,
    private_key_to_pem,
    public_key_to_pem,
)

SIGNING_KEY = "signing-key.pem"
PUBLIC_KEY = "signing-key.pub.pem"


class SigningKeyError(RuntimeError):
    pass


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    key_id: str
    public_pem: bytes


def create_signing_key(directory: Path) -> SigningKey:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / SIGNING_KEY
    if path.exists():
        raise SigningKeyError(f"{path} exists: refusing to replace the fleet's signing key")
    key = generate_private_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_to_pem(key))
        f.flush()
        os.fsync(f.fileno())
    public = public_key_to_pem(key.public_key())
    (directory / PUBLIC_KEY).write_bytes(public)
    return SigningKey(key, key_id(key.public_key()), public)


def load_signing_key(directory: Path) -> SigningKey:
    path = directory / SIGNING_KEY
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"no signing key at {path}: run `edgefleet init` first") from None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SigningKeyError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    key = private_key_from_pem(pem)
    return SigningKey(key, key_id(key.public_key()), public_key_to_pem(key.public_key()))
