"""The manifest matrix: nothing but the fleet's current signing key puts a model on a device.

A real agent, enrolled with a bundle, on the broker from the generated config; the test speaks
as the controller (its own certificate) and tries every way of slipping in a model. The agent
must reject each, keep serving the model it has, and follow key rotations, including one that
happened while it was offline.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import msgspec
import pytest

from agent.slots import Pointers
from agent.trust import StoredTrust
from controller.keys import chain_payload, key_chain, load_signing_key
from edgefleet.contract import CommandKind, DeployCommand, TopicSchema, encode
from edgefleet.contract.keylist import (
    KeyList,
    encode_chain,
    sign_key_list,
    trusted_key,
)
from edgefleet.contract.signing import generate_private_key, sign_manifest
from tests.fleet_peer import Artifact, FleetPeer
from tests.secure_fleet import SecureFleet
from tests.variants_helpers import SOURCE

pytestmark = pytest.mark.timeout(300)


def _peer(fleet: SecureFleet) -> FleetPeer:
    key = load_signing_key(fleet.home / "keys").private
    return FleetPeer(fleet.broker.port, TopicSchema(fleet.root), key,
                     connect=lambda **kw: fleet.as_controller(**kw))


def _pointers(fleet: SecureFleet, device_id: str) -> Pointers:
    path = fleet.tmp / f"state-{device_id}" / "models" / "pointers.json"
    return msgspec.json.decode(path.read_bytes(), type=Pointers)


def _serving(fleet: SecureFleet, device_id: str) -> int | None:
    current = _pointers(fleet, device_id).current
    return current.model_version if current else None


def _trusted_version(fleet: SecureFleet, device_id: str) -> int:
    path = fleet.tmp / f"state-{device_id}" / "trusted-keys.json"
    if not path.exists():
        return 1
    return msgspec.json.decode(path.read_bytes(), type=StoredTrust).list.version


def _publish_chain(fleet: SecureFleet, peer: FleetPeer) -> None:
    """What `edgefleet serve` does after a rotation: the whole chain, retained."""
    peer.client.publish_and_wait(TopicSchema(fleet.root).key_chain,
                                 chain_payload(fleet.home / "keys"), qos=1, retain=True)


def _deploy_command(signed: bytes) -> tuple[str, bytes]:
    command = DeployCommand(command_id=f"cmd-{uuid.uuid4().hex[:8]}", ts=time.time(),
                            manifest=msgspec.Raw(signed), watch_s=1.0)
    return command.command_id, encode(command)


def test_no_manifest_but_one_signed_by_the_current_fleet_key_is_installed(
        secure_broker: SecureFleet, tmp_path: Path) -> None:
    fleet = secure_broker
    schema = TopicSchema(fleet.root)
    peer = _peer(fleet)
    device, other = "dev-a", "dev-b"
    agent = fleet.start_agent(device)
    fleet.start_agent(other)
    peer.wait(lambda: bool(peer.devices[device].presence and peer.devices[other].presence),
              30, "both agents online over TLS")
    v1 = peer.manifest(device, SOURCE, version=1)
    v1_command = peer.deploy(device, v1, watch_s=1.0)
    assert peer.final_status(device, v1_command).state.value == "succeeded"
    v1_signed = sign_manifest(v1, peer.key)

    outcomes: dict[str, str] = {}

    def attack(name: str, signed: bytes, *, expect: str) -> None:
        command_id, payload = _deploy_command(signed)
        peer.send_raw(schema.command(device, CommandKind.DEPLOY), payload)
        status = peer.final_status(device, command_id, timeout=60)
        outcomes[name] = status.state.value
        assert status.state.value != "succeeded", name
        assert expect in status.reason, f"{name}: {status.reason}"

    attack("replayed as is (same version)", v1_signed, expect="replayed")
    unsigned = msgspec.json.encode(peer.manifest(device, SOURCE, version=2))
    attack("unsigned", unsigned, expect="unsigned")
    attack("signed by a key the device does not trust",
           sign_manifest(peer.manifest(device, SOURCE, version=2), generate_private_key()),
           expect="unknown-key")
    tampered = sign_manifest(peer.manifest(device, SOURCE, version=2), peer.key).replace(
        b'"model_version":2', b'"model_version":9')
    attack("changed after signing", tampered, expect="bad-signature")
    attack("another device's manifest",
           sign_manifest(peer.manifest(other, SOURCE, version=2), peer.key),
           expect="wrong-device")
    attack("expired", sign_manifest(peer.manifest(device, SOURCE, version=2,
                                                  expires_in=-60), peer.key),
           expect="expired")
    # An artifact from another release: the manifest names one file, the chunks carry another.
    release_a = bytearray(SOURCE.read_bytes())
    release_a[-1] ^= 1                   # same size, other bytes: only the sha256 can tell
    other_release = peer.manifest(device, bytes(release_a), version=2, register=False)
    peer.artifacts[other_release.artifact_id] = Artifact(SOURCE.read_bytes())
    attack("artifact from another release", sign_manifest(other_release, peer.key),
           expect="sha256")

    # Rotate: the agent follows the chain; the retired key then signs nothing it accepts.
    old_key = peer.key
    fleet.cli("keys", "rotate")
    peer.key = load_signing_key(fleet.home / "keys").private
    _publish_chain(fleet, peer)
    fleet.wait(lambda: _trusted_version(fleet, device) == 2, 20, "key list version 2")
    attack("signed by the retired key",
           sign_manifest(peer.manifest(device, SOURCE, version=2), old_key),
           expect="retired-key")
    v2 = peer.manifest(device, SOURCE, version=2)
    v2_command = peer.deploy(device, v2, watch_s=1.0)
    assert peer.final_status(device, v2_command).state.value == "succeeded"

    # Replays of the older version, re-signed with the current key (the worst case): plainly,
    # retained, and queued in the persistent session.
    attack("replayed older version", sign_manifest(v1, peer.key), expect="replayed")
    command_id, payload = _deploy_command(sign_manifest(v1, peer.key))
    peer.client.publish_and_wait(schema.command(device, CommandKind.DEPLOY), payload,
                                 qos=1, retain=True)
    outcomes["replayed as a retained message"] = peer.final_status(
        device, command_id).state.value
    agent.stop()
    agent.start()                        # the retained replay is delivered again on subscribe
    peer.wait(lambda: sum(p.state.value == "online" for p in peer.devices[device].presence)
              >= 2, 30, "the agent back")
    peer.client.publish_and_wait(schema.command(device, CommandKind.DEPLOY), b"", qos=1,
                                 retain=True)
    agent.stop()
    command_id, payload = _deploy_command(sign_manifest(v1, peer.key))
    peer.send_raw(schema.command(device, CommandKind.DEPLOY), payload)    # queued for it
    agent.start()
    outcomes["replayed as a queued message"] = peer.final_status(device, command_id).state.value

    accepted = [name for name, state in outcomes.items() if state == "succeeded"]
    assert accepted == [], outcomes
    assert len(outcomes) == 11
    assert _serving(fleet, device) == 2
    assert _pointers(fleet, device).current.artifact_id == v2.artifact_id  # type: ignore[union-attr]
    fleet.wait(lambda: bool(peer.telemetry(device)) and peer.telemetry(device)[-1].model
               is not None and peer.telemetry(device)[-1].model.model_version == 2, 20,
               "v2 still serving")
    peer.close()
    print(f"\nmanifest matrix: {len(accepted)} of {len(outcomes)} accepted: {outcomes}")


def test_a_device_offline_during_two_rotations_catches_up_and_drops_the_old_keys(
        secure_broker: SecureFleet) -> None:
    fleet = secure_broker
    peer = _peer(fleet)
    device = "sleeper"
    agent = fleet.start_agent(device)
    peer.wait(lambda: bool(peer.devices[device].presence), 30, "the agent online")
    first_key = peer.key
    agent.stop()
    fleet.cli("keys", "rotate")
    second_key = load_signing_key(fleet.home / "keys").private
    fleet.cli("keys", "rotate")
    peer.key = load_signing_key(fleet.home / "keys").private
    _publish_chain(fleet, peer)
    agent.start()
    fleet.wait(lambda: _trusted_version(fleet, device) == 3, 30,
               "the device on key list version 3")
    for name, key in (("first", first_key), ("second", second_key)):
        command = peer.deploy(device, peer.manifest(device, SOURCE, version=1), key=key)
        status = peer.final_status(device, command)
        assert status.state.value == "rejected" and "retired-key" in status.reason, name
    command = peer.deploy(device, peer.manifest(device, SOURCE, version=1), watch_s=1.0)
    assert peer.final_status(device, command).state.value == "succeeded"
    peer.close()


def test_a_forged_key_chain_changes_nothing(secure_broker: SecureFleet) -> None:
    """Even a party that may write the chain topic cannot add a key without a trusted
    signature: the agent keeps its list and still rejects the forger's manifests."""
    fleet = secure_broker
    peer = _peer(fleet)
    device = "steady"
    fleet.start_agent(device)
    peer.wait(lambda: bool(peer.devices[device].presence), 30, "the agent online")
    forger = generate_private_key()
    forged = sign_key_list(KeyList(version=2, issued_at=time.time(),
                                   keys=(trusted_key(forger.public_key()),)), [forger])
    payload = encode_chain([*_chain_lists(fleet), forged])
    peer.client.publish_and_wait(TopicSchema(fleet.root).key_chain, payload, qos=1,
                                 retain=True)
    time.sleep(1.0)
    assert _trusted_version(fleet, device) == 1
    command = peer.deploy(device, peer.manifest(device, SOURCE, version=1), key=forger)
    assert "unknown-key" in peer.final_status(device, command).reason
    assert "refused a key list" in fleet.agents[device].log_text()
    peer.close()


def _chain_lists(fleet: SecureFleet) -> list[bytes]:
    return key_chain(fleet.home / "keys")



def test_a_deploy_queued_before_a_rotation_still_installs_but_later_ones_by_the_old_key_do_not(
        secure_broker: SecureFleet) -> None:
    """Offline, the device's session queues a deploy signed by the old key, then the chain
    that retires it: the deploy was good when it arrived, so it installs."""
    fleet = secure_broker
    peer = _peer(fleet)
    device = "queued"
    agent = fleet.start_agent(device)
    peer.wait(lambda: bool(peer.devices[device].presence), 30, "the agent online")
    agent.stop()
    old_key = peer.key
    queued = peer.deploy(device, peer.manifest(device, SOURCE, version=1), watch_s=1.0)
    fleet.cli("keys", "rotate")
    peer.key = load_signing_key(fleet.home / "keys").private
    _publish_chain(fleet, peer)
    agent.start()
    assert peer.final_status(device, queued).state.value == "succeeded"
    assert _trusted_version(fleet, device) == 2
    late = peer.deploy(device, peer.manifest(device, SOURCE, version=2), key=old_key)
    status = peer.final_status(device, late)
    assert status.state.value == "rejected" and "retired-key" in status.reason
    peer.close()
