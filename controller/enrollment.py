"""`edgefleet devices enroll`: a device's identity and everything it needs to join the fleet.

The bundle is a folder to copy to the device's /etc/edgefleet: agent.toml (paths in it are
relative to itself, so the folder works wherever it lands), the device's key and certificate,
the CA certificate that proves the broker, and the key chain that roots its trust in manifests.
The device key is created here and leaves only inside the bundle (mode 0600), unless the device
made its own (`edgefleet-agent keygen`) and sent a certificate request: then the bundle has no
key, and the key never left the device.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.files import write_private
from controller.keys import chain_payload
from controller.pki import CertificateKind, FleetCA, IssuedCertificate, read_request
from edgefleet.contract import validate_device_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AGENT_CONFIG = "agent.toml"
DEVICE_CERT = "device.crt"
DEVICE_KEY = "device.key"
CA_CERT = "ca.crt"
KEY_CHAIN = "key-chain.json"

Table = Mapping[str, Any]


@dataclass(frozen=True)
class Bundle:
    directory: Path
    config: Path
    certificate: IssuedCertificate


def enroll_device(ca: FleetCA, keys_dir: Path, device_id: str, directory: Path, *,
                  broker: Table, days: float = 825, valid_from: float | None = None,
                  agent: Mapping[str, Table] | None = None, state_dir: str | None = None,
                  request: bytes | None = None) -> Bundle:
    """Issues the certificate and writes the bundle. `broker` holds host, port and
    topic_root; `agent` adds or overrides other sections of agent.toml (inference,
    hardware, telemetry...). With `request` (a CSR from `edgefleet-agent keygen`) the
    certificate is for the device's own key and the bundle holds no key."""
    validate_device_id(device_id)
    public_key = read_request(request, device_id) if request is not None else None
    # With a request the folder may be the device's own, holding the key keygen made there.
    ours = (DEVICE_CERT, AGENT_CONFIG, CA_CERT, KEY_CHAIN) + (
        (DEVICE_KEY,) if public_key is None else ())
    for name in ours:
        if (directory / name).exists():
            raise FileExistsError(f"{directory / name} exists: choose an empty folder")
    ca.check_name(device_id, CertificateKind.DEVICE)
    directory.mkdir(parents=True, exist_ok=True)
    credentials = ca.issue(device_id, CertificateKind.DEVICE, days=days, valid_from=valid_from,
                           public_key=public_key)
    if public_key is None:
        write_private(directory / DEVICE_KEY, credentials.key_pem)
    (directory / DEVICE_CERT).write_bytes(credentials.cert_pem)
    (directory / CA_CERT).write_bytes(ca.cert_pem)
    (directory / KEY_CHAIN).write_bytes(chain_payload(keys_dir))
    sections: dict[str, dict[str, Any]] = {
        "broker": {**broker, "ca_file": CA_CERT, "cert_file": DEVICE_CERT,
                   "key_file": DEVICE_KEY},
        "trust": {"root_file": KEY_CHAIN},
        "inference": {"source": "directory", "directory": "/var/lib/edgefleet/inputs"},
    }
    for name, values in (agent or {}).items():
        sections[name] = {**sections.get(name, {}), **values}
    top = {"device_id": device_id, "state_dir": state_dir or "/var/lib/edgefleet"}
    config = directory / AGENT_CONFIG
    config.write_text(_toml(top, sections))
    os.chmod(config, 0o644)
    return Bundle(directory, config, credentials.record)


def amend_agent_config(path: Path, sections: Mapping[str, Table]) -> None:
    """Adds or overrides settings in a bundle's agent.toml (the demo's fake hardware root and
    replayed inputs, say), keeping everything enrollment wrote. Section "" is the top level."""
    raw = tomllib.loads(path.read_text())
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    top.update(sections.get("", {}))
    merged = {k: dict(v) for k, v in raw.items() if isinstance(v, dict)}
    for name, values in sections.items():
        if name:
            merged[name] = {**merged.get(name, {}), **values}
    path.write_text(_toml(top, merged))


def _toml(top: Table, sections: Mapping[str, Table]) -> str:
    lines = ["# Written by `edgefleet devices enroll`; paths are relative to this file."]
    lines += [f"{key} = {_value(value)}" for key, value in top.items()]
    for name, values in sections.items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {_value(value)}" for key, value in values.items()
                  if value is not None]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
