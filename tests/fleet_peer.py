"""The controller's side of the wire, for agent tests: signs manifests, sends commands, serves
artifact chunks on request, and records what devices report. It speaks only through a real
Mosquitto with the contract's types, exactly as a controller does."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract import (
    ArtifactChunk,
    BuildMetrics,
    Channel,
    ChunkRequest,
    CommandKind,
    CommandStatus,
    DeployCommand,
    DeviceFacts,
    FileFormat,
    Manifest,
    Presence,
    RollbackCommand,
    Runtime,
    RuntimeRequirement,
    TelemetryBatch,
    TopicSchema,
    VariantKind,
    WireMessage,
    decode_topic,
    encode,
)
from edgefleet.contract.signing import sign_manifest
from tests.broker import LoopbackClient, connect_client

CHUNK_SIZE = 8 * 1024


@dataclass
class Artifact:
    data: bytes
    chunk_size: int = CHUNK_SIZE


@dataclass
class DeviceLog:
    statuses: list[CommandStatus] = field(default_factory=list)
    telemetry: list[TelemetryBatch] = field(default_factory=list)
    presence: list[Presence] = field(default_factory=list)
    facts: list[DeviceFacts] = field(default_factory=list)
    chunk_requests: int = 0


class FleetPeer:
    def __init__(self, port: int, schema: TopicSchema, key: Ed25519PrivateKey, *,
                 connect: Callable[..., LoopbackClient] | None = None) -> None:
        """`connect` makes the client (given on_message=); default: plain MQTT on `port`."""
        self.schema = schema
        self.key = key
        self.artifacts: dict[str, Artifact] = {}
        self.devices: dict[str, DeviceLog] = defaultdict(DeviceLog)
        self.serve_chunks = True
        self._cond = threading.Condition()
        self.client: LoopbackClient = (connect or (lambda **kw: connect_client(port, **kw)))(
            on_message=self._on_message)
        self.client.subscribe_and_wait(f"{schema.root}/dev/+/#", qos=1)

    def close(self) -> None:
        self.client.close()

    # --- what devices report ------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = self.schema.parse(msg.topic)
            message = decode_topic(topic, bytes(msg.payload))
        except Exception:
            return
        if isinstance(message, ChunkRequest):
            self._serve(topic.device_id, message)
            return
        with self._cond:
            log = self.devices[topic.device_id]
            if isinstance(message, CommandStatus):
                log.statuses.append(message)
            elif isinstance(message, TelemetryBatch):
                log.telemetry.append(message)
            elif isinstance(message, Presence):
                log.presence.append(message)
            elif isinstance(message, DeviceFacts):
                log.facts.append(message)
            self._cond.notify_all()

    def _serve(self, device_id: str, request: ChunkRequest) -> None:
        with self._cond:
            self.devices[device_id].chunk_requests += 1
        artifact = self.artifacts.get(request.artifact_id)
        if artifact is None or not self.serve_chunks:
            return
        total = max(1, -(-len(artifact.data) // artifact.chunk_size))
        topic = self.schema.build(Channel.CHUNK, device_id)
        for index in range(request.first, min(total, request.first + request.count)):
            start = index * artifact.chunk_size
            chunk = ArtifactChunk(artifact_id=request.artifact_id, index=index, total=total,
                                  data=artifact.data[start:start + artifact.chunk_size])
            self.client.publish(topic, encode(chunk), qos=1)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self._cond.wait(remaining)

    def final_status(self, device_id: str, command_id: str, timeout: float = 60.0
                     ) -> CommandStatus:
        finals = {"succeeded", "failed", "rejected", "rolled-back"}

        def done() -> bool:
            return any(s.command_id == command_id and s.state.value in finals
                       for s in self.devices[device_id].statuses)

        self.wait(done, timeout, f"a final status for {command_id}")
        return next(s for s in self.devices[device_id].statuses
                    if s.command_id == command_id and s.state.value in finals)

    def statuses(self, device_id: str, command_id: str) -> list[CommandStatus]:
        with self._cond:
            return [s for s in self.devices[device_id].statuses if s.command_id == command_id]

    def telemetry(self, device_id: str) -> list[TelemetryBatch]:
        with self._cond:
            return list(self.devices[device_id].telemetry)

    # --- commands -----------------------------------------------------------------------

    def manifest(self, device_id: str, artifact: Path | bytes, *, version: int,
                 kind: VariantKind = VariantKind.ONNX_FP32,
                 runtime: RuntimeRequirement | None = None, accuracy: float = 0.98,
                 p95_ms: float = 1.0, expires_in: float = 3600.0, model_name: str = "digits",
                 register: bool = True) -> Manifest:
        data = artifact.read_bytes() if isinstance(artifact, Path) else artifact
        sha = hashlib.sha256(data).hexdigest()
        artifact_id = f"{model_name}-v{version}-{kind.value}-{sha[:8]}"
        if register:
            self.artifacts[artifact_id] = Artifact(data)
        now = time.time()
        fmt = FileFormat.TFLITE if kind is VariantKind.TFLITE_INT8 else FileFormat.ONNX
        return Manifest(
            artifact_id=artifact_id, model_name=model_name, model_version=version,
            variant_kind=kind, file_format=fmt,
            runtime=runtime or RuntimeRequirement(runtime=Runtime.ONNXRUNTIME,
                                                  targets=("CPUExecutionProvider",)),
            sha256=sha, size_bytes=len(data), chunk_size=CHUNK_SIZE,
            metrics=BuildMetrics(accuracy=accuracy, latency_p95_ms=p95_ms),
            issued_at=now, expires_at=now + expires_in, device_id=device_id)

    def deploy(self, device_id: str, manifest: Manifest | bytes, *, watch_s: float = 2.0,
               min_accuracy: float | None = None,
               key: Ed25519PrivateKey | None = None) -> str:
        signed = (manifest if isinstance(manifest, bytes)
                  else sign_manifest(manifest, key or self.key))
        command = DeployCommand(command_id=f"cmd-{uuid.uuid4().hex[:8]}", ts=time.time(),
                                manifest=msgspec.Raw(signed), watch_s=watch_s,
                                min_accuracy=min_accuracy)
        self.send(device_id, CommandKind.DEPLOY, command)
        return command.command_id

    def rollback(self, device_id: str, reason: str = "operator") -> str:
        command = RollbackCommand(command_id=f"cmd-{uuid.uuid4().hex[:8]}", ts=time.time(),
                                  reason=reason)
        self.send(device_id, CommandKind.ROLLBACK, command)
        return command.command_id

    def send(self, device_id: str, kind: CommandKind, command: WireMessage) -> None:
        self.client.publish_and_wait(self.schema.command(device_id, kind), encode(command),
                                     qos=1)

    def send_raw(self, topic: str, payload: bytes) -> None:
        self.client.publish_and_wait(topic, payload, qos=1)
