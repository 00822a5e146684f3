"""A light agent simulator for benchmarks: one process holds many real MQTT connections, one per
device, all driven by one selector loop (paho's external-loop calls) instead of a thread each.

Each simulated device speaks the real contract on its own topics: it takes a DeployCommand,
verifies the signed manifest (contract.signing.verify_manifest) against the fleet key, reports
ACCEPTED, asks for chunks in windows (ChunkRequest; what did not come within the chunk timeout
is asked again), checks the size and sha256 of what it assembled, and reports SUCCEEDED. It
installs nothing: "installed and active" is the status. In raw mode the same devices just count
the bytes that arrive on their chunk topic, for a baseline without the protocol.

The parent drives each simulator over a pipe (see `Control`) and gets back when each device was
done, on the monotonic clock, which is one clock for every process on the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import selectors
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.contract import (
    ArtifactChunk,
    Channel,
    ChunkRequest,
    CommandKind,
    CommandState,
    CommandStatus,
    ContractError,
    DeployCommand,
    InstallStage,
    Manifest,
    TopicSchema,
    decode,
    encode,
)
from edgefleet.contract.signing import public_key_from_pem, verify_manifest

HOST = "127.0.0.1"
MISC_EVERY_S = 1.0          # keepalive bookkeeping for every client


# The pipe's messages. From the parent: ("contract",), ("raw", size) or ("idle",) sets the mode
# for the next round and is answered ("armed", chunk requests sent since the last one);
# ("stop",) ends the process. From the simulator: ("ready", devices) once every device is
# subscribed; ("done", [(device_id, monotonic time), ...]) as devices finish; ("failed",
# [(device_id, why), ...]); ("error", text).
@dataclass
class SimDevice:
    device_id: str
    client: paho.Client
    subscribed: bool = False
    # a contract round
    command_id: str = ""
    manifest: Manifest | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    wanted: set[int] = field(default_factory=set)
    asked_at: float = 0.0
    requests: int = 0
    # a raw round
    raw_bytes: int = 0
    finished: bool = False


class Simulator:
    def __init__(self, port: int, root: str, device_ids: list[str],
                 trusted: Mapping[str, Ed25519PublicKey], control: Connection, *,
                 window: int = 8, chunk_timeout_s: float = 5.0) -> None:
        self.port = port
        self.schema = TopicSchema(root)
        self.trusted = trusted
        self.control = control
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.selector = selectors.DefaultSelector()
        self.devices: dict[str, SimDevice] = {}
        self.by_client: dict[int, SimDevice] = {}
        self.mode = "idle"
        self.raw_size = 0
        self.done: list[tuple[str, float]] = []
        self.failed: list[tuple[str, str]] = []
        self.connect_errors: list[str] = []
        self.selector.register(control.fileno(), selectors.EVENT_READ, None)
        for device_id in device_ids:
            self._connect(device_id)

    # --- connections ---------------------------------------------------------------------------

    def _connect(self, device_id: str) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                             protocol=paho.MQTTv5)
        device = SimDevice(device_id, client)
        self.devices[device_id] = device
        self.by_client[id(client)] = device
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.max_queued_messages_set(0)
        try:
            client.connect(HOST, self.port, keepalive=120, clean_start=True)
        except OSError as exc:
            self.connect_errors.append(f"{device_id}: {exc}")

    # paho's external-loop hooks: the selector watches every socket for reading, and for
    # writing only while paho has something queued.
    def _opened(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _closed(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def _want_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _wrote(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ, client)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        device = self.by_client[id(client)]
        if reason.is_failure:
            self.connect_errors.append(f"{device.device_id}: CONNACK {reason}")
            return
        client.subscribe(self.schema.agent_subscriptions(device.device_id))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Any) -> None:
        device = self.by_client[id(client)]
        if any(code.is_failure for code in reason_codes):
            self.connect_errors.append(f"{device.device_id}: SUBACK {reason_codes}")
            return
        device.subscribed = True

    # --- messages ------------------------------------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: Any,
                    message: paho.MQTTMessage) -> None:
        device = self.by_client[id(client)]
        if message.topic == self.schema.key_chain:
            return          # the controller's retained key chain: the simulated keys never rotate
        try:
            topic = self.schema.parse(message.topic)
            if topic.channel is Channel.COMMAND and topic.command is CommandKind.DEPLOY:
                self._deploy(device, decode(DeployCommand, bytes(message.payload)))
            elif topic.channel is Channel.CHUNK and self.mode == "raw":
                self._raw(device, len(message.payload))
            elif topic.channel is Channel.CHUNK and self.mode == "contract":
                self._chunk(device, decode(ArtifactChunk, bytes(message.payload)))
        except ContractError as exc:
            self._fail(device, f"{message.topic}: {exc}")

    def _deploy(self, device: SimDevice, command: DeployCommand) -> None:
        if command.command_id == device.command_id:
            return                                      # a redelivery: already on it
        manifest = verify_manifest(bytes(command.manifest), self.trusted,
                                   device_id=device.device_id, now=time.time())
        device.command_id, device.manifest = command.command_id, manifest
        device.chunks, device.finished = {}, False
        self._status(device, CommandState.ACCEPTED, InstallStage.VERIFIED, "queued")
        self._ask(device)

    def _ask(self, device: SimDevice) -> None:
        assert device.manifest is not None
        missing = [i for i in range(device.manifest.chunk_count) if i not in device.chunks]
        wanted = missing[:self.window]
        device.wanted = set(wanted)
        device.asked_at = time.monotonic()
        device.requests += 1
        request = ChunkRequest(device_id=device.device_id, artifact_id=device.manifest.artifact_id,
                               first=wanted[0], count=wanted[-1] - wanted[0] + 1)
        device.client.publish(self.schema.build(Channel.CHUNK_REQUEST, device.device_id),
                              encode(request), qos=1)

    def _chunk(self, device: SimDevice, chunk: ArtifactChunk) -> None:
        manifest = device.manifest
        if manifest is None or device.finished or chunk.artifact_id != manifest.artifact_id:
            return
        last = manifest.chunk_count - 1
        expected = (manifest.size_bytes - last * manifest.chunk_size if chunk.index == last
                    else manifest.chunk_size)
        if not 0 <= chunk.index <= last or len(chunk.data) != expected:
            self._fail(device, f"chunk {chunk.index} of {len(chunk.data)} bytes refused")
            return
        device.chunks[chunk.index] = chunk.data
        device.wanted.discard(chunk.index)
        if len(device.chunks) < manifest.chunk_count:
            if not device.wanted:
                self._ask(device)
            return
        data = b"".join(device.chunks[i] for i in range(manifest.chunk_count))
        if hashlib.sha256(data).hexdigest() != manifest.sha256:
            self._fail(device, "sha256 mismatch")
            return
        device.finished = True
        self._status(device, CommandState.SUCCEEDED, InstallStage.COMMITTED, "active")
        self.done.append((device.device_id, time.monotonic()))

    def _raw(self, device: SimDevice, size: int) -> None:
        device.raw_bytes += size
        if not device.finished and device.raw_bytes >= self.raw_size:
            device.finished = True
            self.done.append((device.device_id, time.monotonic()))

    def _status(self, device: SimDevice, state: CommandState, stage: InstallStage,
                reason: str) -> None:
        manifest = device.manifest
        status = CommandStatus(
            device_id=device.device_id, command_id=device.command_id, kind="deploy",
            state=state, ts=time.time(), stage=stage,
            model_name=manifest.model_name if manifest else None,
            model_version=manifest.model_version if manifest else None, reason=reason)
        device.client.publish(self.schema.build(Channel.STATUS, device.device_id),
                              encode(status), qos=1)

    def _fail(self, device: SimDevice, reason: str) -> None:
        device.finished = True
        self.failed.append((device.device_id, reason))

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        announced = False
        next_misc = time.monotonic() + MISC_EVERY_S
        while True:
            for key, mask in self.selector.select(timeout=0.2):
                client = key.data
                if client is None:
                    if not self._command(self.control.recv()):
                        return
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            now = time.monotonic()
            if not announced and all(d.subscribed for d in self.devices.values()):
                announced = True
                self.control.send(("ready", len(self.devices)))
            if self.connect_errors:
                self.control.send(("error", "; ".join(self.connect_errors[:5])))
                self.connect_errors.clear()
            if self.done:
                self.control.send(("done", self.done))
                self.done = []
            if self.failed:
                self.control.send(("failed", self.failed))
                self.failed = []
            if now >= next_misc:
                next_misc = now + MISC_EVERY_S
                for device in self.devices.values():
                    device.client.loop_misc()
                    if (self.mode == "contract" and device.manifest is not None
                            and not device.finished and device.wanted
                            and now - device.asked_at > self.chunk_timeout_s):
                        self._ask(device)               # ask again for what did not come

    def _command(self, command: tuple[Any, ...]) -> bool:
        if command[0] == "stop":
            for device in self.devices.values():
                device.client.disconnect()
                device.client.loop_write()
            return False
        self.mode = command[0]
        self.raw_size = command[1] if command[0] == "raw" else 0
        for device in self.devices.values():
            device.raw_bytes, device.finished = 0, False
            device.manifest, device.chunks, device.wanted = None, {}, set()
        self.control.send(("armed", sum(d.requests for d in self.devices.values())))
        for device in self.devices.values():
            device.requests = 0
        return True


def simulate(port: int, root: str, device_ids: list[str], trusted_pems: dict[str, bytes],
             control: Connection, window: int, chunk_timeout_s: float) -> None:
    """A simulator process's body (multiprocessing target)."""
    try:
        trusted = {kid: public_key_from_pem(pem) for kid, pem in trusted_pems.items()}
        Simulator(port, root, device_ids, trusted, control, window=window,
                  chunk_timeout_s=chunk_timeout_s).run()
    except Exception:
        control.send(("error", traceback.format_exc()))
