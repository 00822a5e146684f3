"""The manifest keys this device trusts, and how that changes when the fleet rotates its key.

Two ways to provision trust. The enrollment bundle's key chain (`trust.root_file`): the device
starts from it and follows rotations the controller publishes on ``{root}/fleet/keys``, each
accepted only when signed by a key it trusts already (edgefleet.contract.keylist); the newest
accepted list is kept in the state folder, written atomically, so a restart cannot fall back to
a retired key. Or, without a root file, every ed25519 public key (*.pem) in `trust.keys_dir`,
read on each verification: static keys an operator manages by hand, no rotation.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.durable import write_atomically
from edgefleet.contract import ContractError
from edgefleet.contract.keylist import Advance, KeyList, chain_origin, load_root
from edgefleet.contract.keylist import advance as advance_chain
from edgefleet.contract.signing import key_id, public_key_from_pem

log = logging.getLogger(__name__)

STATE_FILE = "trusted-keys.json"


class StoredTrust(msgspec.Struct, frozen=True):
    """The newest list accepted, and the fleet (bundle chain) it descends from."""

    origin: str
    list: KeyList


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


class TrustStore:
    def __init__(self, *, keys_dir: Path, root_file: Path | None, state_dir: Path) -> None:
        self._keys_dir = keys_dir
        self._state = state_dir / STATE_FILE
        self._lock = threading.Lock()
        self._current: KeyList | None = None
        self._origin = ""
        if root_file is not None:
            self._current = self._load(root_file)

    @property
    def rotating(self) -> bool:
        return self._current is not None

    @property
    def version(self) -> int | None:
        with self._lock:
            return self._current.version if self._current else None

    def keys(self) -> dict[str, Ed25519PublicKey]:
        with self._lock:
            current = self._current
        return current.public_keys() if current else trusted_keys(self._keys_dir)

    def retired(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._current.retired) if self._current else frozenset()

    def apply_chain(self, payload: bytes) -> Advance | None:
        """Follows a published key chain as far as it verifies; None without a root file."""
        with self._lock:
            if self._current is None:
                return None
            result = advance_chain(self._current, payload)
            if result.accepted:
                write_atomically(self._state, msgspec.json.encode(
                    StoredTrust(self._origin, result.current)), mode=0o600)
                self._current = result.current
        if result.accepted:
            log.info("trusted keys now version %d (%s); retired: %s", result.current.version,
                     ", ".join(result.current.public_keys()),
                     ", ".join(result.current.retired) or "none")
        if result.stopped is not None:
            log.warning("refused a key list: %s", result.stopped)
        return result

    def _load(self, root_file: Path) -> KeyList:
        try:
            bundle = root_file.read_bytes()
        except OSError as exc:
            raise ContractError("trust.root_file", "$", "a readable key chain",
                                f"{root_file}: {exc.strerror or exc}") from None
        root = load_root(bundle)
        self._origin = chain_origin(bundle)
        try:
            stored = msgspec.json.decode(self._state.read_bytes(), type=StoredTrust)
        except FileNotFoundError:
            return root
        except (msgspec.DecodeError, ValueError) as exc:
            # Our own file, written atomically: unreadable means the disk lied. Start over from
            # the bundle; the retained chain brings the device forward again on connect.
            log.error("ignoring %s (%s): starting from the bundle's key list", self._state, exc)
            return root
        if stored.origin != self._origin:
            log.warning("ignoring %s: it follows another fleet's keys (the device was "
                        "re-enrolled); starting from the bundle's key list", self._state)
            return root
        return stored.list if stored.list.version >= root.version else root
