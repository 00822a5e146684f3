"""The wire contract between controller and agent: topics, messages, manifest and signing.

Both sides import this package and nothing of each other. It imports no I/O library (an
import-linter contract in pyproject.toml, run by tests/test_architecture.py, enforces it).
"""

from edgefleet.contract.codec import CHANNEL_TYPES, COMMAND_TYPES, decode, decode_topic, encode
from edgefleet.contract.errors import ContractError, DecodeError, EncodeError, ManifestRejected
from edgefleet.contract.manifest import BuildMetrics, Manifest, Runtime, RuntimeRequirement
from edgefleet.contract.messages import (
    ActiveModel,
    ArtifactChunk,
    ChunkRequest,
    CommandState,
    CommandStatus,
    ConfigCommand,
    DeployCommand,
    DeviceFacts,
    FileFormat,
    HardwareFacts,
    Heartbeat,
    InstallStage,
    LatencyStats,
    Presence,
    PresenceState,
    RollbackCommand,
    RuntimeFact,
    ShadowCommand,
    TelemetryBatch,
    VariantKind,
    WireMessage,
)
from edgefleet.contract.topics import (
    CHANNELS,
    Channel,
    ChannelSpec,
    CommandKind,
    Direction,
    Encoding,
    Topic,
    TopicSchema,
    validate_device_id,
)

__all__ = [
    "CHANNELS", "CHANNEL_TYPES", "COMMAND_TYPES", "ActiveModel", "ArtifactChunk", "BuildMetrics",
    "Channel", "ChannelSpec", "ChunkRequest", "CommandKind", "CommandState", "CommandStatus",
    "ConfigCommand", "ContractError", "DecodeError", "DeployCommand", "DeviceFacts", "Direction",
    "EncodeError", "Encoding", "FileFormat", "HardwareFacts", "Heartbeat", "InstallStage",
    "LatencyStats", "Manifest", "ManifestRejected", "Presence", "PresenceState",
    "RollbackCommand", "Runtime", "RuntimeFact", "RuntimeRequirement", "ShadowCommand",
    "TelemetryBatch", "Topic", "TopicSchema", "VariantKind", "WireMessage", "decode",
    "decode_topic", "encode", "validate_device_id",
]
