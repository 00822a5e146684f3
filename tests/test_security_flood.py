"""Oversize artifacts and floods against a real agent on the generated broker config.

What the agent may hold is bounded by what it declared or configured, never by what a sender
pushes: memory stays flat, the state folder grows by at most the artifact's declared size, the
deploy queue is bounded, and the model it serves keeps serving throughout.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import msgspec
import psutil
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from controller.keys import load_signing_key
from edgefleet.contract import (
    ArtifactChunk,
    Channel,
    CommandKind,
    ConfigCommand,
    DeployCommand,
    TopicSchema,
    encode,
)
from edgefleet.contract.signing import sign_manifest
from tests.broker import MessageCollector
from tests.fleet_peer import Artifact, FleetPeer
from tests.secure_fleet import SecureFleet
from tests.variants_helpers import SOURCE

pytestmark = pytest.mark.timeout(300)
DEVICE = "rpi4-flooded"
RPI4_LIMIT = 64 * 2**20          # profiles/rpi4.toml max_model_bytes


def _tree_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def _publish_many(peer: FleetPeer, topic: str, payloads: list[bytes], window: int = 500) -> None:
    """QoS 1 with a bounded number in flight (paho silently drops beyond ~65,000)."""
    pending = []
    for payload in payloads:
        pending.append(peer.client.publish(topic, payload, qos=1))
        if len(pending) >= window:
            for info in pending:
                info.wait_for_publish(30)
            pending.clear()
    for info in pending:
        info.wait_for_publish(30)


def test_oversize_artifacts_and_floods_leave_memory_disk_and_the_running_model_intact(
        secure_broker: SecureFleet) -> None:
    fleet = secure_broker
    schema = TopicSchema(fleet.root)
    key = load_signing_key(fleet.home / "keys").private
    peer = FleetPeer(fleet.broker.port, schema, key,
                     connect=lambda **kw: fleet.as_controller(**kw))
    fleet.enroll(DEVICE, fakeroot="rpi4",
                 agent={"install": {"download_timeout_s": 6.0, "chunk_timeout_s": 1.0}})
    agent = fleet.start_agent(DEVICE)
    peer.wait(lambda: bool(peer.devices[DEVICE].presence), 30, "the agent online")
    v1 = peer.deploy(DEVICE, peer.manifest(DEVICE, SOURCE, version=1), watch_s=1.0)
    assert peer.final_status(DEVICE, v1).state.value == "succeeded"
    state = fleet.tmp / f"state-{DEVICE}"
    assert agent.proc is not None
    process = psutil.Process(agent.proc.pid)
    time.sleep(2.0)
    rss_before, disk_before = process.memory_info().rss, _tree_bytes(state)
    figures: dict[str, object] = {}

    # 1. An artifact ten times the rpi4 profile's limit, declared honestly: refused before a
    #    byte is fetched or a file of that size is made.
    huge = peer.manifest(DEVICE, SOURCE, version=2, register=False)
    huge = msgspec.structs.replace(huge, size_bytes=10 * RPI4_LIMIT)
    status = peer.final_status(DEVICE, peer.deploy(DEVICE, huge))
    assert status.state.value == "rejected" and "exceeds the profile's limit" in status.reason
    assert peer.devices[DEVICE].chunk_requests == 0 or not list(state.rglob("*.part"))
    figures["10x-limit artifact"] = status.reason

    # 2. A manifest that declares a small file while the sender pushes ten times as much,
    #    plus endless chunks of other artifacts and out-of-range indexes meanwhile.
    small = SOURCE.read_bytes()
    liar = peer.manifest(DEVICE, small, version=2, register=False)
    peer.artifacts[liar.artifact_id] = Artifact(small * 10)
    command = peer.deploy(DEVICE, liar)
    chunk_topic = schema.build(Channel.CHUNK, DEVICE)
    junk = [encode(ArtifactChunk(artifact_id=liar.artifact_id if i % 2 else "other",
                                 index=10_000 + i, total=20_000, data=b"\xff" * 4096))
            for i in range(20_000)]
    _publish_many(peer, chunk_topic, junk)
    status = peer.final_status(DEVICE, command, timeout=60)
    assert status.state.value == "failed", status
    parts = list(state.rglob("*.part"))
    assert all(p.stat().st_size <= liar.size_bytes for p in parts), parts
    figures["lying manifest"] = status.reason
    figures["junk chunks sent"] = len(junk)

    # 3. A storm of commands: deploys far beyond the queue, config changes, undecodable bytes,
    #    while an install is busy (its chunks withheld), so the queue must hold them.
    peer.serve_chunks = False
    busy = peer.deploy(DEVICE, peer.manifest(DEVICE, SOURCE, version=3))
    peer.wait(lambda: peer.devices[DEVICE].chunk_requests > 0, 20, "the busy install")
    storm_ids = []
    deploys = []
    for _ in range(300):
        signed = sign_manifest(peer.manifest(DEVICE, SOURCE, version=1, register=False), key)
        command_id = f"storm-{uuid.uuid4().hex[:8]}"
        storm_ids.append(command_id)
        deploys.append(encode(DeployCommand(command_id=command_id, ts=time.time(),
                                            manifest=msgspec.Raw(signed))))
    _publish_many(peer, schema.command(DEVICE, CommandKind.DEPLOY), deploys)
    configs = [encode(ConfigCommand(command_id=f"cfg-{i}", ts=time.time(),
                                    telemetry_interval_s=0.5)) for i in range(3000)]
    _publish_many(peer, schema.command(DEVICE, CommandKind.CONFIG), configs)
    garbage = [os.urandom(64) for _ in range(3000)]
    _publish_many(peer, schema.command(DEVICE, CommandKind.ROLLBACK), garbage)
    # 4. A message over the broker's message_size_limit reaches nobody; one under it does.
    #    (MQTT 3.1.1 here: Mosquitto answers an MQTT 5 sender with PUBACK reason 0x95, which
    #    paho 2 cannot parse and then resends forever, reconnecting each time.)
    seen = MessageCollector()
    probe = fleet.probe(on_message=seen)
    probe.subscribe_and_wait(schema.filter(Channel.TELEMETRY, "big-sender"))
    sender = fleet.as_device("big-sender", protocol=MQTTProtocolVersion.MQTTv311)
    topic = schema.build(Channel.TELEMETRY, "big-sender")
    sender.publish_and_wait(topic, b"\0" * 2**20)
    sender.publish_and_wait(topic, b"small")
    assert [m.payload for m in seen.wait_for(1)] == [b"small"]
    seen.expect_none(0.5)
    figures["over message_size_limit"] = "dropped by the broker"

    finals = {"succeeded", "failed", "rejected", "rolled-back"}
    peer.wait(lambda: all(any(s.state.value in finals for s in peer.statuses(DEVICE, c))
                          for c in storm_ids), 120, "a final status for every storm deploy")
    full = [c for c in storm_ids
            if any("queue full" in s.reason for s in peer.statuses(DEVICE, c))]
    assert full, "the deploy queue never filled: the bound was not exercised"
    assert peer.final_status(DEVICE, busy).state.value == "failed"
    assert not any(s.state.value == "succeeded" for c in storm_ids
                   for s in peer.statuses(DEVICE, c)), "a replayed version 1 was installed"

    time.sleep(2.0)
    rss_after, disk_after = process.memory_info().rss, _tree_bytes(state)
    assert agent.alive
    assert rss_after - rss_before < 64 * 2**20, (rss_before, rss_after)
    # The state folder grew by less than the declared size of what was being downloaded, plus
    # the outbox's statuses for thousands of commands.
    assert disk_after - disk_before < liar.size_bytes + 8 * 2**20, (disk_before, disk_after)
    current = msgspec.json.decode((state / "models" / "pointers.json").read_bytes())["current"]
    assert current["model_version"] == 1
    before = len(peer.telemetry(DEVICE))
    peer.wait(lambda: any(b.model is not None and b.model.model_version == 1
                          and b.inferences > 0 for b in peer.telemetry(DEVICE)[before:]),
              30, "version 1 still serving after the storm")
    figures.update({"storm deploys": len(deploys), "refused as queue full": len(full),
                    "config commands": len(configs), "garbage commands": len(garbage),
                    "agent RSS MB before/after": (round(rss_before / 2**20, 1),
                                                  round(rss_after / 2**20, 1)),
                    "state dir MB before/after": (round(disk_before / 2**20, 2),
                                                  round(disk_after / 2**20, 2))})
    peer.close()
    print("\nflood:", figures)
