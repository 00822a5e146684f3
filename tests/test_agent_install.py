"""The agent end to end on a real Mosquitto with real runtimes: installs that commit, manifests
that must be refused, and new models that must be rolled back, while the old model serves."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from edgefleet.contract import CommandKind, VariantKind
from edgefleet.contract.signing import generate_private_key
from tests.agent_fleet import DEVICE, Fleet, deploy_v1
from tests.model_builders import constant_model, nan_model, slow_model
from tests.variants_helpers import SOURCE


def test_a_deploy_walks_every_stage_and_commits(fleet: Fleet, int8_model: Path) -> None:
    deploy_v1(fleet)
    manifest = fleet.peer.manifest(DEVICE, int8_model, version=2, kind=VariantKind.ONNX_INT8)
    command = fleet.peer.deploy(DEVICE, manifest, watch_s=1.5, min_accuracy=0.9)
    final = fleet.peer.final_status(DEVICE, command)
    assert final.state.value == "succeeded", final.reason
    stages = [s.stage.value for s in fleet.peer.statuses(DEVICE, command) if s.stage]
    assert stages == ["received", "verified", "downloading", "staged", "smoke-tested",
                      "activated", "watching", "committed"]
    fleet.serving(2)
    pointers = fleet.pointers()
    assert pointers.current is not None and pointers.current.model_version == 2
    assert pointers.previous is not None and pointers.previous.model_version == 1
    batch = fleet.peer.telemetry(DEVICE)[-1]
    assert batch.accuracy is not None and batch.accuracy > 0.95
    assert batch.execution == "onnxruntime/CPUExecutionProvider"


def _reason(fleet: Fleet, manifest_bytes: bytes) -> str:
    command = fleet.peer.deploy(DEVICE, manifest_bytes)
    final = fleet.peer.final_status(DEVICE, command)
    assert final.state.value == "rejected", final
    return final.reason


def test_bad_manifests_are_rejected_and_the_old_model_keeps_serving(fleet: Fleet,
                                                                    int8_model: Path) -> None:
    from edgefleet.contract.signing import sign_manifest

    deploy_v1(fleet)
    peer = fleet.peer
    good = peer.manifest(DEVICE, int8_model, version=2, kind=VariantKind.ONNX_INT8)
    stranger = generate_private_key()
    obj = msgspec.json.decode(sign_manifest(good, peer.key))
    tampered = msgspec.json.encode({**obj, "size_bytes": obj["size_bytes"] + 1})
    cases = {
        "unsigned": msgspec.json.encode({**obj, "signature": ""}),
        "unknown-key": sign_manifest(good, stranger),
        "bad-signature": tampered,
        "wrong-device": sign_manifest(msgspec.structs.replace(good, device_id="other-01"),
                                      peer.key),
        "expired": sign_manifest(peer.manifest(DEVICE, int8_model, version=2,
                                               expires_in=-1), peer.key),
        "replayed": sign_manifest(peer.manifest(DEVICE, SOURCE, version=1), peer.key),
    }
    for expected, payload in cases.items():
        assert expected in _reason(fleet, payload), expected
    fleet.serving(1)
    assert fleet.pointers().current.model_version == 1  # type: ignore[union-attr]


def test_a_model_returning_nan_is_refused_by_the_smoke_test(fleet: Fleet,
                                                            tmp_path: Path) -> None:
    deploy_v1(fleet)
    manifest = fleet.peer.manifest(DEVICE, nan_model(tmp_path), version=2)
    command = fleet.peer.deploy(DEVICE, manifest)
    final = fleet.peer.final_status(DEVICE, command)
    assert final.state.value == "failed" and "NaN" in final.reason
    assert final.stage is not None and final.stage.value == "rejected"
    fleet.serving(1)


def test_an_inaccurate_model_is_refused_by_the_smoke_test_floor(fleet: Fleet,
                                                                tmp_path: Path) -> None:
    deploy_v1(fleet)
    manifest = fleet.peer.manifest(DEVICE, constant_model(tmp_path), version=2)
    command = fleet.peer.deploy(DEVICE, manifest, watch_s=5.0, min_accuracy=0.9)
    final = fleet.peer.final_status(DEVICE, command)
    assert final.state.value == "failed" and "below the floor" in final.reason
    fleet.serving(1)


def test_a_much_slower_model_is_rolled_back_in_the_watch_window(fleet: Fleet,
                                                                tmp_path: Path) -> None:
    deploy_v1(fleet)
    fleet.serving(1)
    # The manifest's build-time p95 is generous, so the smoke test lets it through; the watch
    # compares live p95 with the previous model's and rolls it back.
    manifest = fleet.peer.manifest(DEVICE, slow_model(tmp_path), version=2, p95_ms=100.0)
    command = fleet.peer.deploy(DEVICE, manifest, watch_s=6.0)
    final = fleet.peer.final_status(DEVICE, command)
    assert final.state.value == "rolled-back", final.reason
    assert "p95 latency" in final.reason and "previous model" in final.reason
    stages = [s.stage.value for s in fleet.peer.statuses(DEVICE, command) if s.stage]
    assert stages[-3:] == ["watching", "rolling-back", "rolled-back"]
    fleet.serving(1)
    assert fleet.pointers().current.model_version == 1  # type: ignore[union-attr]
    # The same version is not retried automatically.
    again = fleet.peer.deploy(DEVICE, manifest)
    final = fleet.peer.final_status(DEVICE, again)
    assert final.state.value == "rejected" and "not retried automatically" in final.reason


def test_malformed_commands_are_answered_and_the_agent_keeps_running(fleet: Fleet) -> None:
    deploy_v1(fleet)
    topic = fleet.peer.schema.command(DEVICE, CommandKind.DEPLOY)
    fleet.peer.send_raw(topic, b'{"type":"deploy","v":1,"command_id":"bad-1","ts":"soon"}')
    fleet.peer.send_raw(topic, b"\x00\xffnot json at all")
    status = fleet.peer.final_status(DEVICE, "bad-1", timeout=10)
    assert status.state.value == "rejected" and "ts" in status.reason
    time.sleep(1.0)
    assert fleet.agent.alive
    fleet.serving(1)


def test_an_unreadable_queued_deploy_is_dropped_and_the_next_one_installs(
        fleet: Fleet) -> None:
    """A queued command the agent cannot read back (a damaged file, or one stored by a bug)
    once stopped every install after it, on every start."""
    from agent.install.runner import QUEUE_KEY
    from agent.outbox import Outbox

    deploy_v1(fleet)
    fleet.agent.stop()
    with Outbox(fleet.state / "agent.db") as outbox:
        outbox.set(QUEUE_KEY, msgspec.msgpack.encode([b"\x93not a deploy command"]))
    fleet.agent.start()
    command = fleet.peer.deploy(DEVICE, fleet.peer.manifest(DEVICE, SOURCE, version=2),
                                watch_s=1.0)
    assert fleet.peer.final_status(DEVICE, command).state.value == "succeeded"
    assert "dropped an unreadable queued deploy" in fleet.agent.log_text()
    fleet.serving(2)
