"""`edgefleet broker-config`, `devices enroll|revoke`, `keys list|rotate`: who may speak on the
broker, and which key may put a model on a device."""

from __future__ import annotations

import time
from pathlib import Path

import click
import msgspec
from sqlalchemy import insert, select, update

from controller.broker_config import write_broker_config
from controller.cli.context import home_option, json_option, open_fleet, show
from controller.cli.output import console
from controller.db.schema import AuditEntry, Device
from controller.enrollment import enroll_device
from controller.keys import SigningKeyError, key_chain, rotate_signing_key
from controller.pki import (
    CertificateKind,
    FleetCA,
    PKIError,
    certificate_names,
    ensure_fleet_ca,
)
from controller.settings import write_settings
from edgefleet.contract import TopicSchema
from edgefleet.contract.errors import EncodeError
from edgefleet.contract.keylist import read_list

PKI_DIR = "pki"


def _ca(home: Path) -> FleetCA:
    try:
        return FleetCA.load(home / PKI_DIR)
    except PKIError as exc:
        raise click.ClickException(str(exc)) from None


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for pair in (p for group in pairs for p in group.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise click.ClickException(f"labels are key=value, got {pair!r}")
        labels[key] = value
    return labels


@click.command("broker-config")
@home_option
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where to write it (default: HOME/broker).")
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535))
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--hostname", "hostnames", multiple=True,
              help="Name or address devices use to reach the broker (repeatable); goes into "
                   "the broker's certificate.")
@click.option("--observer", "observers", multiple=True,
              help="Also issue a read-only identity with this name (repeatable).")
@click.option("--controller", "controllers", multiple=True,
              help="Also issue a controller identity with this name, for another `edgefleet "
                   "serve` process (repeatable).")
@click.option("--user", "run_as", help="Account Mosquitto runs as when started as root "
              "(it must read the broker key); default: Mosquitto's own.")
def broker_config(home: Path | None, out_dir: Path | None, port: int, bind: str,
                  hostnames: tuple[str, ...], observers: tuple[str, ...],
                  controllers: tuple[str, ...], run_as: str | None) -> None:
    """Write a Mosquitto config: mutual TLS, per-device ACL, revocation list, limits; point the
    controller at it."""
    with open_fleet(home) as fleet:
        try:
            ca = ensure_fleet_ca(fleet.home, fleet.settings.broker.client_id)
        except PKIError as exc:
            raise click.ClickException(str(exc)) from None
        schema = TopicSchema(fleet.settings.broker.topic_root)
        directory = (out_dir or fleet.home / "broker").resolve()
        try:
            files = write_broker_config(ca, schema, directory, port=port, bind=bind,
                                        hostnames=hostnames, observers=observers,
                                        controllers=controllers, run_as=run_as)
        except EncodeError as exc:
            raise click.ClickException(f"identity name {exc.got}: {exc.expected}") from None
        except (PKIError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        if not files.controllers:
            raise click.ClickException("the CA has issued no controller certificate: run "
                                       "`edgefleet init` in a fresh home")
        broker = fleet.settings.broker
        connect_to = hostnames[0] if hostnames else (
            "127.0.0.1" if bind in ("0.0.0.0", "::") else bind)
        write_settings(fleet.home, msgspec.structs.replace(
            fleet.settings, broker=msgspec.structs.replace(
                broker, host=connect_to, port=port, ca_file=f"{PKI_DIR}/ca.crt",
                cert_file=f"{PKI_DIR}/controller.crt", key_file=f"{PKI_DIR}/controller.key")))
    console().print(f"broker config {files.conf}\n  ACL {files.acl} (controllers: "
                    f"{', '.join(files.controllers)}"
                    + (f"; observers: {', '.join(files.observers)}" if observers else "")
                    + f")\n  TLS listener {bind}:{port}, client certificates required\n"
                    f"  controller now connects to {connect_to}:{port}\n"
                    f"start it with: mosquitto -c {files.conf}")


@click.command("enroll")
@home_option
@click.argument("device_id")
@click.option("--label", "--labels", "labels", multiple=True,
              help="key=value (repeatable, or comma-separated: site=a,tier=canary).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Bundle folder (default: HOME/enrollments/DEVICE_ID).")
@click.option("--broker-host", help="Host devices use (default: the controller's).")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650),
              help="Certificate lifetime.")
@click.option("--csr", "request_file", type=click.Path(path_type=Path, dir_okay=False),
              help="The device's certificate request (edgefleet-agent keygen): certify its own "
                   "key; the bundle then holds no key.")
def devices_enroll(home: Path | None, device_id: str, labels: tuple[str, ...],
                   out_dir: Path | None, broker_host: str | None, days: int,
                   request_file: Path | None) -> None:
    """Issue DEVICE_ID a client certificate and write its bundle (agent config, key,
    certificate, CA, trusted keys)."""
    parsed = _labels(labels)
    try:
        request = request_file.read_bytes() if request_file is not None else None
    except OSError as exc:
        raise click.ClickException(f"{request_file}: {exc.strerror or exc}") from None
    with open_fleet(home) as fleet:
        ca = _ca(fleet.home)
        broker = fleet.settings.broker
        if not broker.ca_file:
            raise click.ClickException("the controller has no TLS broker yet: run `edgefleet "
                                       "broker-config` first")
        directory = (out_dir or fleet.home / "enrollments" / device_id).resolve()
        try:
            bundle = enroll_device(ca, fleet.home / "keys", device_id, directory, days=days,
                                   broker={"host": broker_host or broker.host,
                                           "port": broker.port,
                                           "topic_root": broker.topic_root},
                                   request=request)
        except EncodeError as exc:
            raise click.ClickException(f"device id {device_id!r}: {exc.expected}") from None
        except (PKIError, FileExistsError) as exc:
            raise click.ClickException(str(exc)) from None
        with fleet.db.begin() as conn:
            exists = conn.execute(select(Device.labels).where(Device.id == device_id)).first()
            if exists is None:
                conn.execute(insert(Device).values(id=device_id, labels=parsed))
            elif parsed:
                conn.execute(update(Device).where(Device.id == device_id).values(
                    labels={**(exists[0] or {}), **parsed}))
            conn.execute(insert(AuditEntry).values(
                ts=time.time(), actor="operator", action="device.enroll", subject=device_id,
                detail={"serial": str(bundle.certificate.serial), "labels": parsed,
                        "not_after": bundle.certificate.not_after}))
    host = broker_host or broker.host
    server_cert = fleet.home / "broker" / "server.crt"
    if server_cert.exists() and host not in certificate_names(server_cert.read_bytes()):
        # The device would refuse the broker (hostname check): say so now, not on site.
        console().print(f"[yellow]warning: the broker certificate in {server_cert} does not "
                        f"name {host!r}; the device will refuse the broker. Run `edgefleet "
                        f"broker-config --hostname {host}` (and restart the broker).[/yellow]")
    console().print(f"enrolled {device_id}: certificate {bundle.certificate.serial:x}, valid "
                    f"{days} days\n  bundle {directory} (copy it to the device's "
                    f"/etc/edgefleet; {bundle.config.name} is its agent config"
                    + ("; the device keeps its own device.key)" if request else ")"))


@click.command("revoke")
@home_option
@click.argument("device_id")
def devices_revoke(home: Path | None, device_id: str) -> None:
    """Revoke DEVICE_ID's certificates: the broker refuses it once it reloads the CRL."""
    with open_fleet(home) as fleet:
        ca = _ca(fleet.home)
        try:
            revoked = ca.revoke(device_id, CertificateKind.DEVICE, time.time())
        except PKIError as exc:
            raise click.ClickException(str(exc)) from None
        if not revoked:
            raise click.ClickException(f"{device_id!r} holds no live device certificate")
        with fleet.db.begin() as conn:
            conn.execute(insert(AuditEntry).values(
                ts=time.time(), actor="operator", action="device.revoke", subject=device_id,
                detail={"serials": [str(r.serial) for r in revoked]}))
    console().print(f"revoked {len(revoked)} certificate(s) of {device_id}; revocation list "
                    f"{ca.crl_path}\nrestart the broker (or send it SIGHUP) so it reads it")


@click.group()
def keys() -> None:
    """The manifest signing key and its rotations."""


@keys.command("list")
@home_option
@json_option
def keys_list(home: Path | None, as_json: bool) -> None:
    """Every key list the fleet has issued, oldest first."""
    with open_fleet(home) as fleet:
        chain = key_chain(fleet.home / "keys")
    rows = []
    for payload in chain:
        key_list = read_list(payload)
        rows.append({"version": key_list.version, "issued_at": key_list.issued_at,
                     "active": ", ".join(k.key_id for k in key_list.keys),
                     "retired": ", ".join(key_list.retired),
                     "signed_by": ", ".join(s.key_id for s in key_list.signatures)})
    show(rows, ["version", "active", "retired", "signed_by"], "Key lists", as_json)


@keys.command("rotate")
@home_option
def keys_rotate(home: Path | None) -> None:
    """New signing key; the old one is retired once devices take the new key list."""
    with open_fleet(home) as fleet:
        try:
            rotation = rotate_signing_key(fleet.home / "keys")
        except SigningKeyError as exc:
            raise click.ClickException(str(exc)) from None
        with fleet.db.begin() as conn:
            conn.execute(insert(AuditEntry).values(
                ts=time.time(), actor="operator", action="keys.rotate", subject="fleet",
                detail={"retired": rotation.retired, "active": rotation.active,
                        "version": rotation.version}))
    console().print(f"key list version {rotation.version}: signing with {rotation.active}, "
                    f"{rotation.retired} retired\n`edgefleet serve` publishes the list to the "
                    "fleet (retained); devices offline now take it when they return")
