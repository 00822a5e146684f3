"""`edgefleet init|serve|devices|models|variants|fleet|telemetry`: the fleet in the database."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import click
from sqlalchemy import desc, exc, insert, select, text, update

from controller.cli.context import connect, home_option, json_option, open_fleet, show
from controller.cli.output import console
from controller.cli.variants import KIND_NAMES
from controller.db.engine import safe_url
from controller.db.migrate import upgrade
from controller.db.schema import (
    AuditEntry,
    Device,
    Model,
    ModelVersion,
    Telemetry,
    Variant,
)
from controller.keys import SIGNING_KEY, SigningKeyError, create_signing_key
from controller.mqtt import BrokerUnavailable
from controller.pki import PKIError, ensure_fleet_ca
from controller.settings import (
    BrokerSection,
    default_settings,
    resolve_home,
    write_settings,
)
from controller.variants.record import RecordError
from controller.variants.source import SourceError


@click.command()
@home_option
@click.option("--database-url", help="Default: SQLite in the home folder.")
@click.option("--broker-host", default="127.0.0.1", show_default=True)
@click.option("--broker-port", default=1883, show_default=True, type=int)
@click.option("--topic-root", default="edgefleet", show_default=True)
def init(home: Path | None, database_url: str | None, broker_host: str, broker_port: int,
         topic_root: str) -> None:
    """Create the controller home: settings, the fleet's signing key and CA, the database."""
    resolved = resolve_home(home)
    keys = resolved / "keys"
    if (keys / SIGNING_KEY).exists():
        raise click.ClickException(f"{keys / SIGNING_KEY} exists: refusing to replace the "
                                   "fleet's signing key (this home is initialised already)")
    resolved.mkdir(parents=True, exist_ok=True)
    settings = default_settings(resolved, database_url,
                                BrokerSection(host=broker_host, port=broker_port,
                                              topic_root=topic_root))
    # The database first: a home whose database is unreachable gets no key, so init can be
    # run again once it is reachable, instead of refusing to replace the key it left behind.
    db = connect(settings.database_url)
    try:
        upgrade(db)
    except (exc.OperationalError, exc.InterfaceError, exc.ProgrammingError) as error:
        raise click.ClickException(f"database {safe_url(db.url)}: cannot create the tables: "
                                   f"{str(error.orig).strip().splitlines()[0]}") from None
    finally:
        db.dispose()
    try:
        key = create_signing_key(keys)
        ca = ensure_fleet_ca(resolved, settings.broker.client_id)
    except (SigningKeyError, PKIError) as error:
        raise click.ClickException(str(error)) from None
    path = write_settings(resolved, settings)
    (resolved / "artifacts").mkdir(exist_ok=True)
    console().print(f"controller home {resolved}\n  settings  {path}\n  signing key "
                    f"{key.key_id} (public key: {keys / 'signing-key.pub.pem'}; devices trust "
                    "it through their enrollment bundle)\n"
                    f"  fleet CA  {ca.cert_path} (controller certificate "
                    f"{settings.broker.client_id!r})\n  database  {settings.database_url}\n"
                    "next: `edgefleet broker-config`, then `edgefleet devices enroll ID`")


@click.command()
@home_option
@click.option("-v", "--verbose", is_flag=True)
def serve(home: Path | None, verbose: bool) -> None:
    """Run the controller: ingest, artifact distribution and rollouts."""
    from controller.service import Controller

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open_fleet(home, migrate=True) as fleet:
        try:
            controller = Controller(fleet.home, fleet.settings)
        except SigningKeyError as exc:
            raise click.ClickException(str(exc)) from None
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        try:
            sys.exit(controller.run(stop))
        except BrokerUnavailable as exc:
            raise click.ClickException(str(exc)) from None


@click.group()
def devices() -> None:
    """Devices that announced themselves."""


@devices.command("list")
@home_option
@json_option
def devices_list(home: Path | None, as_json: bool) -> None:
    with open_fleet(home) as fleet, fleet.db.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(
            Device.id, Device.profile, Device.hardware_known, Device.online, Device.labels,
            Device.active_model_name, Device.active_model_version, Device.active_variant_kind,
            Device.active_execution).order_by(Device.id)).mappings()]
    show(rows, ["id", "profile", "online", "labels", "active_model_name",
                "active_model_version", "active_variant_kind", "active_execution"],
         "Devices", as_json)


@devices.command("show")
@home_option
@json_option
@click.argument("device_id")
def devices_show(home: Path | None, as_json: bool, device_id: str) -> None:
    with open_fleet(home) as fleet, fleet.db.connect() as conn:
        row = conn.execute(select(Device.__table__).where(Device.id == device_id)
                           ).mappings().one_or_none()
    if row is None:
        raise click.ClickException(f"unknown device {device_id!r}: see `edgefleet devices "
                                   "list`")
    show([dict(row)], list(row.keys()), f"Device {device_id}", as_json)


@devices.command("label")
@home_option
@click.argument("device_id")
@click.argument("labels", nargs=-1, required=True)
def devices_label(home: Path | None, device_id: str, labels: tuple[str, ...]) -> None:
    """Set labels (key=value; key= removes one)."""
    parsed = []
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise click.ClickException(f"labels are key=value, got {label!r}")
        parsed.append((key, value))
    with open_fleet(home) as fleet, fleet.db.begin() as conn:
        current = conn.execute(select(Device.labels).where(Device.id == device_id)
                               ).scalar_one_or_none()
        if current is None and not conn.execute(
                select(Device.id).where(Device.id == device_id)).first():
            raise click.ClickException(f"unknown device {device_id!r}")
        merged = dict(current or {})
        for key, value in parsed:
            if value:
                merged[key] = value
            else:
                merged.pop(key, None)
        conn.execute(update(Device).where(Device.id == device_id).values(labels=merged))
        conn.execute(insert(AuditEntry).values(ts=time.time(), actor="operator",
                                               action="device.label", subject=device_id,
                                               detail={"labels": merged}))
    console().print(f"{device_id}: {merged}")


@click.group()
def models() -> None:
    """Models and their versions."""


@models.command("add")
@home_option
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path))
@click.option("--name", help="Model name (default: from the ONNX metadata).")
@click.option("--version", "version", type=click.IntRange(min=1), help="Default: next.")
@click.option("--only", multiple=True, type=click.Choice(KIND_NAMES),
              help="Build only these variant kinds (repeatable). Default: all.")
def models_add(home: Path | None, source: Path, data_path: Path, name: str | None,
               version: int | None, only: tuple[str, ...]) -> None:
    """Build the variants of SOURCE with the pipeline and register them."""
    from controller.registry import RegistryError, register_model

    with open_fleet(home) as fleet:
        try:
            result = register_model(fleet.db, fleet.home / "artifacts", source, data_path,
                                    name=name, version=version, only=only,
                                    progress=lambda kind, what: console().print(
                                        f"  {kind.value:<18} {what}"))
        except (SourceError, RecordError, RegistryError) as exc:
            raise click.ClickException(str(exc)) from None
    console().print(f"registered {result.model_name} v{result.version}: "
                    f"{len(result.variants)} variants" + (
                        f", {len(result.failures)} failed" if result.failures else ""))
    for failure in result.failures:
        console().print(f"[red]{failure}[/red]")
    if result.failures:
        sys.exit(1)


@models.command("list")
@home_option
@json_option
def models_list(home: Path | None, as_json: bool) -> None:
    with open_fleet(home) as fleet, fleet.db.connect() as conn:
        rows = [dict(r) for r in conn.execute(
            select(Model.name, ModelVersion.version, ModelVersion.source_sha256,
                   ModelVersion.created_at)
            .join(ModelVersion, ModelVersion.model_id == Model.id)
            .order_by(Model.name, ModelVersion.version)).mappings()]
    show(rows, ["name", "version", "source_sha256"], "Models", as_json)


@click.group()
def variants_db() -> None:
    """Registered variants."""


@variants_db.command("list")
@home_option
@json_option
@click.option("--model", help="Only this model.")
def variants_list(home: Path | None, as_json: bool, model: str | None) -> None:
    with open_fleet(home) as fleet, fleet.db.connect() as conn:
        query = (select(Variant.id, Model.name.label("model"), ModelVersion.version,
                        Variant.kind, Variant.artifact_id, Variant.size_bytes,
                        Variant.accuracy, Variant.latency_p95_ms, Variant.measured_on)
                 .join(ModelVersion, ModelVersion.id == Variant.model_version_id)
                 .join(Model, Model.id == ModelVersion.model_id)
                 .order_by(Model.name, ModelVersion.version, Variant.kind))
        if model:
            query = query.where(Model.name == model)
        rows = [dict(r) for r in conn.execute(query).mappings()]
    show(rows, ["id", "model", "version", "kind", "size_bytes", "accuracy", "latency_p95_ms",
                "measured_on"], "Variants", as_json)


@click.group()
def fleet_group() -> None:
    """The fleet at a glance."""


@fleet_group.command("status")
@home_option
@json_option
def fleet_status(home: Path | None, as_json: bool) -> None:
    """One row per device, from the fleet_status view."""
    with open_fleet(home) as fleet, fleet.db.connect() as conn:
        rows = [dict(r) for r in conn.execute(text(
            "SELECT * FROM fleet_status ORDER BY device_id")).mappings()]
    show(rows, ["device_id", "profile", "online", "model_name", "model_version",
                "variant_kind", "execution", "p95_ms", "accuracy", "rollout_id",
                "deployment_state"], "Fleet status", as_json)


@click.group()
def telemetry() -> None:
    """Telemetry windows."""


@telemetry.command("show")
@home_option
@json_option
@click.argument("device_id")
@click.option("--last", default=10, show_default=True, type=click.IntRange(min=1),
              help="How many of the newest windows.")
def telemetry_show(home: Path | None, as_json: bool, device_id: str, last: int) -> None:
    with open_fleet(home) as fleet, fleet.db.connect() as conn:
        if not conn.execute(select(Device.id).where(Device.id == device_id)).first():
            raise click.ClickException(f"unknown device {device_id!r}")
        rows = [dict(r) for r in conn.execute(
            select(Telemetry.seq, Telemetry.window_end, Telemetry.model_version,
                   Telemetry.variant_kind, Telemetry.execution, Telemetry.inferences,
                   Telemetry.errors, Telemetry.p95_ms, Telemetry.accuracy,
                   Telemetry.cpu_percent, Telemetry.rss_mb)
            .where(Telemetry.device_id == device_id)
            .order_by(desc(Telemetry.window_end)).limit(last)).mappings()]
    show(rows, ["seq", "model_version", "variant_kind", "execution", "inferences", "errors",
                "p95_ms", "accuracy", "cpu_percent", "rss_mb"], f"Telemetry of {device_id}",
         as_json)
