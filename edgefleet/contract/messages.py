"""Typed, frozen, versioned messages: every payload that crosses MQTT.

Each struct is tagged (``"type": ...``) and carries ``"v"``, its schema version. Readers ignore
fields they do not know, so a minor addition needs no new version; a change that old readers
would misread bumps ``VERSION`` and gets its own golden file. Statuses map unknown values to
``UNKNOWN`` instead of failing, so a newer agent never crashes an older controller.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import msgspec


class _Lenient(enum.Enum):
    """An enum that decodes values it does not know as ``UNKNOWN``."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls.__members__["UNKNOWN"]


class PresenceState(_Lenient):
    ONLINE = "online"
    OFFLINE = "offline"
    UNKNOWN = "unknown"


class VariantKind(_Lenient):
    """What a variant is, which decides where it may run (selection reads the profiles)."""

    ONNX_FP32 = "onnx-fp32"
    ONNX_FP16 = "onnx-fp16"
    ONNX_INT8 = "onnx-int8"
    ONNX_PRUNED_INT8 = "onnx-pruned-int8"
    TFLITE_INT8 = "tflite-int8"
    UNKNOWN = "unknown"


class FileFormat(_Lenient):
    ONNX = "onnx"
    TFLITE = "tflite"
    UNKNOWN = "unknown"


class CommandState(_Lenient):
    """Where a command stands, as the device reports it."""

    ACCEPTED = "accepted"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled-back"
    UNKNOWN = "unknown"


class InstallStage(_Lenient):
    """The agent's install state machine states, reported in command status."""

    RECEIVED = "received"
    VERIFIED = "verified"
    DOWNLOADING = "downloading"
    STAGED = "staged"
    SMOKE_TESTED = "smoke-tested"
    ACTIVATED = "activated"
    WATCHING = "watching"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    REJECTED = "rejected"
    UNKNOWN = "unknown"


class WireMessage(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every payload. ``v`` is the schema version of the concrete type."""

    VERSION: ClassVar[int] = 1
    v: int = 1


# --- parts -------------------------------------------------------------------------------------

class RuntimeFact(msgspec.Struct, frozen=True, kw_only=True):
    """One inference runtime as found on the device, with what actually loads."""

    name: str                        # "onnxruntime" or "litert"
    available: bool
    version: str | None = None
    module: str | None = None        # the import that worked: "ai_edge_litert", "tflite_runtime"
    targets: tuple[str, ...] = ()    # providers or delegates that load, best first
    missing: tuple[str, ...] = ()    # e.g. "edgetpu: unavailable: libedgetpu.so.1 not found"
    detail: str = ""                 # why the runtime itself is unavailable


class HardwareFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the device's filesystem says about its hardware (agent reads it from a root)."""

    arch: str                                  # uname machine: "aarch64", "x86_64", "armv7l"
    machine_model: str | None = None           # /proc/device-tree/model
    cpu_model: str | None = None
    cpu_cores: int = 1
    memory_mb: int = 0
    os_release: str | None = None              # PRETTY_NAME from /etc/os-release
    usb_ids: tuple[str, ...] = ()              # "vendor:product", lower-case hex
    apex_devices: tuple[str, ...] = ()         # /dev/apex_* (Coral PCIe / M.2)
    tegra_release: str | None = None           # first line of /etc/nv_tegra_release


class ActiveModel(msgspec.Struct, frozen=True, kw_only=True):
    model_name: str
    model_version: int
    variant_kind: VariantKind
    artifact_id: str


class LatencyStats(msgspec.Struct, frozen=True, kw_only=True):
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


# --- device -> controller ----------------------------------------------------------------------

class Presence(WireMessage, frozen=True, kw_only=True, tag="presence"):
    device_id: str
    state: PresenceState
    ts: float
    agent_version: str = ""


class DeviceFacts(WireMessage, frozen=True, kw_only=True, tag="facts"):
    device_id: str
    ts: float
    hardware: HardwareFacts
    runtimes: tuple[RuntimeFact, ...] = ()
    profile: str | None = None                 # matched profile name, None for unknown hardware
    agent_version: str = ""
    active_model: ActiveModel | None = None


class Heartbeat(WireMessage, frozen=True, kw_only=True, tag="heartbeat"):
    device_id: str
    ts: float
    uptime_s: float


class TelemetryBatch(WireMessage, frozen=True, kw_only=True, tag="telemetry"):
    """One telemetry window. ``seq`` is per device and monotonic across restarts."""

    device_id: str
    seq: int
    window_start: float
    window_end: float
    model: ActiveModel | None
    execution: str = ""                        # what ran, e.g. "litert/cpu", "onnxruntime/CUDA"
    inferences: int = 0
    errors: int = 0
    throughput_ips: float = 0.0
    latency: LatencyStats | None = None
    labelled: int = 0                          # how many inferences had a label
    accuracy: float | None = None
    agreement: float | None = None             # with the reference model's outputs, if known
    cpu_percent: float | None = None
    rss_mb: float | None = None
    temperature_c: float | None = None
    dropped_windows: int = 0                   # windows the bounded outbox had to drop, ever


class CommandStatus(WireMessage, frozen=True, kw_only=True, tag="status"):
    device_id: str
    command_id: str
    kind: str                                  # CommandKind value; str so new kinds still parse
    state: CommandState
    ts: float
    stage: InstallStage | None = None
    model_name: str | None = None
    model_version: int | None = None
    reason: str = ""


class ChunkRequest(WireMessage, frozen=True, kw_only=True, tag="chunk-request"):
    """Asks for ``count`` chunks from ``first``: the device sets the window it can absorb."""

    device_id: str
    artifact_id: str
    first: int
    count: int


# --- controller -> device ----------------------------------------------------------------------

class ArtifactChunk(WireMessage, frozen=True, kw_only=True, tag="chunk"):
    artifact_id: str
    index: int
    total: int
    data: bytes


class DeployCommand(WireMessage, frozen=True, kw_only=True, tag="deploy"):
    """Install the signed manifest's artifact, watch it, commit or roll back.

    ``manifest`` is the signed manifest's JSON object exactly as the controller encoded it, so the
    device verifies the signature over the bytes it received (see contract.signing).
    """

    command_id: str
    ts: float
    manifest: msgspec.Raw
    rollout_id: str | None = None
    watch_s: float = 60.0                      # how long to watch before committing
    min_accuracy: float | None = None          # on-device accuracy floor that forces rollback


class RollbackCommand(WireMessage, frozen=True, kw_only=True, tag="rollback"):
    command_id: str
    ts: float
    reason: str
    rollout_id: str | None = None


class ShadowCommand(WireMessage, frozen=True, kw_only=True, tag="shadow"):
    """Run a candidate beside the active model on the same inputs and report agreement."""

    command_id: str
    ts: float
    manifest: msgspec.Raw
    duration_s: float = 300.0


class ConfigCommand(WireMessage, frozen=True, kw_only=True, tag="config"):
    command_id: str
    ts: float
    telemetry_interval_s: float | None = None
    heartbeat_interval_s: float | None = None
