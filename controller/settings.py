"""The controller's home folder: settings (controller.toml), signing key, artifacts, database.

Every `edgefleet` command finds the home from --home, else $EDGEFLEET_HOME, else ./edgefleet-home.
A broken settings file names the field, like the agent's config.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SETTINGS_FILE = "controller.toml"
DEFAULT_HOME = "edgefleet-home"


class SettingsError(ValueError):
    pass


class BrokerSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 1883
    topic_root: str = "edgefleet"
    client_id: str = "edgefleet-controller"
    share_group: str | None = None
    username: str | None = None
    password: str | None = None
    # Mutual TLS (`edgefleet init` issues the controller's certificate); relative to the home.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class ControllerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database_url: str
    broker: BrokerSection = BrokerSection()
    manifest_ttl_s: float = 7 * 86_400.0
    chunk_size: int = 32 * 1024
    tick_s: float = 1.0
    ingest_batch: int = 500
    ingest_flush_s: float = 0.2


def resolve_home(home: Path | None) -> Path:
    return (home or Path(os.environ.get("EDGEFLEET_HOME", DEFAULT_HOME))).resolve()


def default_settings(home: Path, database_url: str | None = None,
                     broker: BrokerSection | None = None) -> ControllerSettings:
    return ControllerSettings(database_url=database_url or f"sqlite:///{home / 'fleet.db'}",
                              broker=broker or BrokerSection())


def write_settings(home: Path, settings: ControllerSettings) -> Path:
    lines = [f'database_url = "{settings.database_url}"',
             f"manifest_ttl_s = {settings.manifest_ttl_s}",
             f"chunk_size = {settings.chunk_size}", f"tick_s = {settings.tick_s}", "",
             "[broker]"]
    for field in settings.broker.__struct_fields__:
        value = getattr(settings.broker, field)
        if value is not None:
            lines.append(f"{field} = {value!r}".replace("'", '"') if isinstance(value, str)
                         else f"{field} = {value}")
    path = home / SETTINGS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def load_settings(home: Path) -> ControllerSettings:
    path = home / SETTINGS_FILE
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"{path}: not found: run `edgefleet init` (or pass --home)"
                            ) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, ControllerSettings)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = re.search(r"at `\$\.?([^`]*)`", text)
        field = where.group(1) if where else ""
        raise SettingsError(f"{path}: field '{field}': {text.split(' - at ')[0]}") from None
