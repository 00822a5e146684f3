"""The one error family of the wire contract.

Errors say whose fault they are (after h11's Local/RemoteProtocolError): a peer sent us bytes we
cannot accept (`DecodeError`), or we were about to put something invalid on the wire
(`EncodeError`). Callers catch `ContractError` to handle both.
"""

from __future__ import annotations


class ContractError(ValueError):
    """Something violates the wire contract.

    `what` names the message or topic, `field` the JSON path inside it (``$`` for the whole
    payload), `expected` and `got` say what was wrong, so a log line is enough to act on.
    """

    def __init__(self, what: str, field: str, expected: str, got: str) -> None:
        self.what = what
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{what}: at {field}: expected {expected}, got {got}")


class DecodeError(ContractError):
    """A peer sent a payload or topic we cannot accept; the peer is at fault."""


class EncodeError(ContractError):
    """We tried to send something the contract does not allow; our code is at fault."""


class ManifestRejected(ContractError):
    """A manifest failed verification. `reason` is a short stable code for logs and status."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__("Manifest", "$", f"a manifest that passes '{reason}'", detail)
