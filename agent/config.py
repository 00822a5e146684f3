"""The agent's configuration file (TOML), checked before the agent connects anywhere.

A broken config names the file and the field (``agent.toml: field 'broker.port': expected int,
got str``) and the agent exits non-zero; a typo in a field name is an error too, not a silently
ignored setting.
"""

from __future__ import annotations

import enum
import math
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from edgefleet.contract import TopicSchema, validate_device_id
from edgefleet.contract.errors import EncodeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    def __init__(self, path: Path, field: str, problem: str) -> None:
        self.path = path
        self.field = field
        super().__init__(f"{path}: field '{field}': {problem}" if field
                         else f"{path}: {problem}")


class InputSource(enum.Enum):
    REPLAY = "replay"          # a labelled npz replayed in a loop: gives on-device accuracy
    DIRECTORY = "directory"    # new .npy files dropped into a folder


class BrokerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    topic_root: str = "edgefleet"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0


class TrustConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    keys_dir: Path = Path("/etc/edgefleet/keys")   # *.pem ed25519 public keys, no rotation
    root_file: Path | None = None                   # the bundle's key chain: follows rotations


class InferenceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    source: InputSource = InputSource.REPLAY
    replay_file: Path | None = None                 # npz with eval_x/eval_y (or x/y)
    directory: Path | None = None
    batch_size: int = 1
    pace_s: float = 0.0                             # sleep between batches (0: flat out)
    threads: int = 1


class TelemetryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    interval_s: float = 10.0
    heartbeat_interval_s: float = 30.0
    outbox_max_rows: int = 100_000
    outbox_max_bytes: int = 64 * 2**20
    outbox_max_age_s: float = 7 * 86_400
    max_inflight: int = 200                         # unacknowledged publishes at once


class InstallConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    chunk_window: int = 8                           # chunks requested at once
    max_queued_deploys: int = 8                     # more waiting are refused, with a status
    chunk_timeout_s: float = 10.0
    download_timeout_s: float = 600.0
    smoke_samples: int = 64
    smoke_max_latency_ms: float | None = None       # default: 20x the manifest's p95 + 20 ms
    watch_max_error_rate: float = 0.01
    watch_max_latency_factor: float = 3.0           # p95 against the previous model's
    watch_min_latency_increase_ms: float = 1.0      # and at least this much slower: sub-ms
                                                    # p95s jitter by more than 3x on a busy CPU


class HardwareConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    root: Path = Path("/")                          # read facts from here (a fake root in demos)
    profile: str | None = None                      # force a profile instead of matching


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    device_id: str
    state_dir: Path = Path("/var/lib/edgefleet")
    broker: BrokerConfig = BrokerConfig()
    trust: TrustConfig = TrustConfig()
    inference: InferenceConfig = InferenceConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    install: InstallConfig = InstallConfig()
    hardware: HardwareConfig = HardwareConfig()

    @property
    def topics(self) -> TopicSchema:
        return TopicSchema(self.broker.topic_root)


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$\.?(?P<at>[^`]*)`)?$", re.DOTALL)


def load_config(path: Path) -> AgentConfig:
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    try:
        config = msgspec.convert(raw, AgentConfig, dec_hook=_paths)
    except msgspec.ValidationError as exc:
        match = _AT.match(str(exc))
        what, field = (match.group("what"), match.group("at") or "") if match else (str(exc), "")
        if unknown := re.match(r"Object contains unknown field `(.+)`", what):
            field = f"{field}.{unknown.group(1)}" if field else unknown.group(1)
            what = "unknown field (a typo?)"
        elif missing := re.match(r"Object missing required field `(.+)`", what):
            field = f"{field}.{missing.group(1)}" if field else missing.group(1)
            what = "required"
        raise ConfigError(path, field, what) from None
    config = _anchor(config, path.resolve().parent)
    _check(path, config)
    return config


S = TypeVar("S", bound=msgspec.Struct)


def _anchor(section: S, base: Path) -> S:
    """Relative paths are relative to the config file, so an enrollment bundle (agent.toml
    beside its certificates) works wherever it is unpacked."""
    changes: dict[str, Any] = {}
    for name in section.__struct_fields__:
        value = getattr(section, name)
        if isinstance(value, Path) and not value.is_absolute():
            changes[name] = base / value
        elif isinstance(value, msgspec.Struct):
            changes[name] = _anchor(value, base)
    return msgspec.structs.replace(section, **changes)


def _paths(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    # msgspec turns a TypeError into a ValidationError naming the field; NotImplementedError
    # would escape load_config as a traceback.
    raise TypeError(f"expected a path (a string), got {type(value).__name__}")


def _check(path: Path, config: AgentConfig) -> None:
    try:
        TopicSchema(config.broker.topic_root)
    except EncodeError as exc:
        raise ConfigError(path, "broker.topic_root", str(exc)) from None
    try:
        validate_device_id(config.device_id)
    except EncodeError as exc:
        raise ConfigError(path, "device_id", str(exc)) from None
    if not 0 < config.broker.port < 65536:
        raise ConfigError(path, "broker.port", f"{config.broker.port} is not a TCP port")
    tls = (config.broker.cert_file, config.broker.key_file)
    if any(tls) and not all(tls):
        raise ConfigError(path, "broker.cert_file", "cert_file and key_file go together")
    source = config.inference
    if source.source is InputSource.REPLAY and source.replay_file is None:
        raise ConfigError(path, "inference.replay_file", "required when source = \"replay\"")
    if source.source is InputSource.DIRECTORY and source.directory is None:
        raise ConfigError(path, "inference.directory", "required when source = \"directory\"")
    telemetry, install = config.telemetry, config.install
    for name, value in (("telemetry.interval_s", telemetry.interval_s),
                        ("telemetry.heartbeat_interval_s", telemetry.heartbeat_interval_s),
                        ("telemetry.outbox_max_rows", telemetry.outbox_max_rows),
                        ("telemetry.outbox_max_bytes", telemetry.outbox_max_bytes),
                        ("telemetry.outbox_max_age_s", telemetry.outbox_max_age_s),
                        ("inference.batch_size", source.batch_size),
                        ("telemetry.max_inflight", telemetry.max_inflight),
                        ("install.chunk_window", install.chunk_window),
                        ("install.max_queued_deploys", install.max_queued_deploys),
                        ("install.chunk_timeout_s", install.chunk_timeout_s),
                        ("install.download_timeout_s", install.download_timeout_s),
                        ("install.smoke_samples", install.smoke_samples)):
        # Written so that NaN fails too: NaN <= 0 is false, and a NaN interval never fires.
        if not 0 < value < math.inf:
            raise ConfigError(path, name, f"must be a positive finite number, got {value}")
