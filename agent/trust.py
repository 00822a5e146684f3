"""The manifest keys this device trusts: every ed25519 public key (*.pem) in the keys folder.

Read on each verification, so a key an operator adds (or a rotation writes) takes effect
without a restart. A file that is not an ed25519 public key is skipped with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.contract import ContractError
from edgefleet.contract.signing import key_id, public_key_from_pem

log = logging.getLogger(__name__)


def trusted_keys(directory: Path) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    if not directory.is_dir():
        return keys
    for path in sorted(directory.glob("*.pem")):
        try:
            key = public_key_from_pem(path.read_bytes())
        except (OSError, ValueError, ContractError) as exc:
            log.warning("ignoring %s: not an ed25519 public key (%s)", path, exc)
            continue
        keys[key_id(key)] = key
    return keys
