"""One example of every wire message, the source of the golden files in tests/golden/.

Golden files are written once per message type and version by `python -m tests.contract_examples`
(it refuses to overwrite). A test decodes each file and re-encodes it byte for byte, so an
accidental change of the wire format fails; a deliberate one adds a new version and a new file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract import (
    ActiveModel,
    ArtifactChunk,
    BuildMetrics,
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
    Manifest,
    Presence,
    PresenceState,
    RollbackCommand,
    Runtime,
    RuntimeFact,
    RuntimeRequirement,
    ShadowCommand,
    TelemetryBatch,
    VariantKind,
    WireMessage,
)
from edgefleet.contract.signing import sign_manifest

GOLDEN_DIR = Path(__file__).parent / "golden"
T0 = 1_795_000_000.0  # a fixed instant (2026-11-18) so the files never change
# A fixed, public test key: ed25519 signatures are deterministic, so the signed golden is stable.
TEST_SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))

ACTIVE = ActiveModel(model_name="digits", model_version=2, variant_kind=VariantKind.TFLITE_INT8,
                     artifact_id="digits-v2-tflite-int8-1f3a")

MANIFEST = Manifest(
    artifact_id="digits-v2-tflite-int8-1f3a", model_name="digits", model_version=2,
    variant_kind=VariantKind.TFLITE_INT8, file_format=FileFormat.TFLITE,
    runtime=RuntimeRequirement(runtime=Runtime.LITERT, targets=("edgetpu", "cpu")),
    sha256="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    size_bytes=23_456, chunk_size=16_384,
    metrics=BuildMetrics(accuracy=0.9611, agreement=0.9889, latency_p50_ms=0.041,
                         latency_p95_ms=0.058, measured_on="litert/cpu", params=12_345,
                         macs=234_567),
    issued_at=T0, expires_at=T0 + 7 * 86_400, device_id="coral-usb-0007")
SIGNED_MANIFEST = sign_manifest(MANIFEST, TEST_SIGNING_KEY)

EXAMPLES: dict[str, WireMessage] = {
    "presence": Presence(device_id="coral-usb-0007", state=PresenceState.ONLINE, ts=T0,
                         agent_version="0.1.0"),
    "facts": DeviceFacts(
        device_id="coral-usb-0007", ts=T0,
        hardware=HardwareFacts(arch="aarch64", machine_model="Raspberry Pi 4 Model B Rev 1.4",
                               cpu_model="Cortex-A72", cpu_cores=4, memory_mb=3_794,
                               os_release="Debian GNU/Linux 12 (bookworm)",
                               usb_ids=("18d1:9302",)),
        runtimes=(RuntimeFact(name="onnxruntime", available=True, version="1.17.3",
                              module="onnxruntime", targets=("CPUExecutionProvider",)),
                  RuntimeFact(name="litert", available=True, version="2.3.0",
                              module="ai_edge_litert", targets=("edgetpu", "cpu"))),
        profile="coral-usb-rpi4", agent_version="0.1.0", active_model=ACTIVE),
    "heartbeat": Heartbeat(device_id="coral-usb-0007", ts=T0, uptime_s=3_600.5),
    "telemetry": TelemetryBatch(
        device_id="coral-usb-0007", seq=42, window_start=T0, window_end=T0 + 10, model=ACTIVE,
        execution="litert/edgetpu", inferences=1_000, errors=0, throughput_ips=100.0,
        latency=LatencyStats(p50_ms=2.5, p95_ms=3.75, p99_ms=4.5, max_ms=9.0), labelled=1_000,
        accuracy=0.96, agreement=0.99, cpu_percent=12.5, rss_mb=61.25, temperature_c=48.3,
        dropped_windows=0),
    "status": CommandStatus(device_id="coral-usb-0007", command_id="cmd-7f2c", kind="deploy",
                            state=CommandState.IN_PROGRESS, ts=T0, stage=InstallStage.STAGED,
                            model_name="digits", model_version=2, reason=""),
    "chunk-request": ChunkRequest(device_id="coral-usb-0007",
                                  artifact_id="digits-v2-tflite-int8-1f3a", first=0, count=4),
    "chunk": ArtifactChunk(artifact_id="digits-v2-tflite-int8-1f3a", index=0, total=2,
                           data=b"TFL3\x00\x01\x02\xff"),
    "deploy": DeployCommand(command_id="cmd-7f2c", ts=T0, manifest=msgspec.Raw(SIGNED_MANIFEST),
                            rollout_id="ro-0003", watch_s=120.0, min_accuracy=0.9),
    "rollback": RollbackCommand(command_id="cmd-8a01", ts=T0, reason="gate: accuracy 0.71 < 0.9",
                                rollout_id="ro-0003"),
    "shadow": ShadowCommand(command_id="cmd-9b11", ts=T0, manifest=msgspec.Raw(SIGNED_MANIFEST),
                            duration_s=600.0),
    "config": ConfigCommand(command_id="cmd-a001", ts=T0, telemetry_interval_s=10.0,
                            heartbeat_interval_s=None),
}


def golden_path(name: str, message: WireMessage) -> Path:
    return GOLDEN_DIR / f"{name}.v{type(message).VERSION}.json"


def golden_manifest_path() -> Path:
    return GOLDEN_DIR / f"manifest.v{Manifest.VERSION}.json"


def main() -> int:
    written = 0
    targets = {golden_path(n, m): msgspec.json.encode(m) for n, m in EXAMPLES.items()}
    targets[golden_manifest_path()] = SIGNED_MANIFEST
    for path, payload in targets.items():
        if path.exists():
            continue  # a committed golden file is the wire format: never rewrite it
        path.write_bytes(payload + b"\n")
        written += 1
        print(f"wrote {path}")
    print(f"{written} new golden files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
