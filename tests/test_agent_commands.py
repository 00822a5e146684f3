"""Commands besides deploy, and what the agent says about itself, end to end."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import msgspec
import pytest

from controller.variants.builders import tflite_int8
from controller.variants.source import load_data, load_source
from edgefleet.contract import (
    CommandKind,
    ConfigCommand,
    PresenceState,
    Runtime,
    RuntimeRequirement,
    ShadowCommand,
    VariantKind,
)
from edgefleet.contract.signing import sign_manifest
from tests.agent_fleet import DEVICE, Fleet, deploy_v1
from tests.variants_helpers import DATA, SOURCE


@pytest.fixture(scope="module")
def tflite_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = load_source(SOURCE)
    return tflite_int8.build(source, load_data(DATA, source),
                             tmp_path_factory.mktemp("tflite")).path


def test_the_agent_announces_its_facts_and_presence_and_the_broker_its_death(
        fleet: Fleet) -> None:
    log = fleet.peer.devices[DEVICE]
    fleet.peer.wait(lambda: bool(log.facts), 10, "facts")
    facts = log.facts[-1]
    assert facts.profile == "x86-64"
    assert {r.name for r in facts.runtimes} == {"onnxruntime", "litert"}
    litert = next(r for r in facts.runtimes if r.name == "litert")
    assert any("libedgetpu.so.1" in m for m in litert.missing)   # said plainly, not pretended
    assert log.presence[-1].state is PresenceState.ONLINE
    fleet.agent.kill()
    fleet.peer.wait(lambda: log.presence[-1].state is PresenceState.OFFLINE, 20,
                    "the last will")


def test_an_explicit_rollback_goes_back_and_lowers_the_version_floor(
        fleet: Fleet, int8_model: Path) -> None:
    deploy_v1(fleet)
    manifest = fleet.peer.manifest(DEVICE, int8_model, version=2, kind=VariantKind.ONNX_INT8)
    assert fleet.peer.final_status(
        DEVICE, fleet.peer.deploy(DEVICE, manifest, watch_s=1.0)).state.value == "succeeded"
    fleet.serving(2)
    command = fleet.peer.rollback(DEVICE, reason="operator says so")
    status = fleet.peer.final_status(DEVICE, command)
    assert status.state.value == "succeeded" and "operator says so" in status.reason
    fleet.serving(1)
    assert fleet.pointers().current.model_version == 1  # type: ignore[union-attr]
    # Only an explicit rollback goes back; afterwards v2 may be deployed again (a new command).
    again = fleet.peer.deploy(DEVICE, fleet.peer.manifest(DEVICE, int8_model, version=2,
                                                          kind=VariantKind.ONNX_INT8),
                              watch_s=1.0)
    assert fleet.peer.final_status(DEVICE, again).state.value == "succeeded"


def test_a_rollback_with_nothing_to_go_back_to_fails_cleanly(fleet: Fleet) -> None:
    deploy_v1(fleet)
    status = fleet.peer.final_status(DEVICE, fleet.peer.rollback(DEVICE))
    assert status.state.value == "failed" and "no previous model" in status.reason
    fleet.serving(1)


def test_shadow_mode_reports_agreement_and_latency_without_switching(
        fleet: Fleet, int8_model: Path) -> None:
    deploy_v1(fleet)
    manifest = fleet.peer.manifest(DEVICE, int8_model, version=2, kind=VariantKind.ONNX_INT8)
    assert fleet.peer.final_status(
        DEVICE, fleet.peer.deploy(DEVICE, manifest, watch_s=1.0)).state.value == "succeeded"
    # Shadow the previous model (v1, still in its slot) beside the active v2.
    v1 = fleet.pointers().previous
    assert v1 is not None
    command = ShadowCommand(command_id=f"cmd-{uuid.uuid4().hex[:8]}", ts=time.time(),
                            manifest=msgspec.Raw(v1.manifest), duration_s=2.0)
    fleet.peer.send(DEVICE, CommandKind.SHADOW, command)
    status = fleet.peer.final_status(DEVICE, command.command_id, timeout=20)
    assert status.state.value == "succeeded", status.reason
    assert "agreement 0.9" in status.reason or "agreement 1.0" in status.reason
    assert "p95" in status.reason
    fleet.serving(2)
    assert fleet.pointers().current.model_version == 2  # type: ignore[union-attr]


def test_a_config_command_changes_the_telemetry_interval(fleet: Fleet) -> None:
    deploy_v1(fleet)
    command = ConfigCommand(command_id="cfg-1", ts=time.time(), telemetry_interval_s=0.2)
    fleet.peer.send(DEVICE, CommandKind.CONFIG, command)
    assert fleet.peer.final_status(DEVICE, "cfg-1").state.value == "succeeded"
    count = len(fleet.peer.telemetry(DEVICE))
    time.sleep(2.0)
    assert len(fleet.peer.telemetry(DEVICE)) - count >= 6   # ~10 windows of 0.2 s


def test_a_tflite_variant_installs_and_runs_on_litert_saying_where(
        fleet: Fleet, tflite_model: Path) -> None:
    deploy_v1(fleet)
    manifest = fleet.peer.manifest(
        DEVICE, tflite_model, version=2, kind=VariantKind.TFLITE_INT8,
        runtime=RuntimeRequirement(runtime=Runtime.LITERT, targets=("edgetpu", "cpu")))
    status = fleet.peer.final_status(DEVICE, fleet.peer.deploy(DEVICE, manifest, watch_s=1.5,
                                                               min_accuracy=0.9))
    assert status.state.value == "succeeded", status.reason
    fleet.serving(2)
    batch = fleet.peer.telemetry(DEVICE)[-1]
    assert batch.execution == "litert/cpu"
    assert batch.accuracy is not None and batch.accuracy > 0.95


def test_an_edge_tpu_only_model_is_refused_where_there_is_no_edge_tpu(
        fleet: Fleet, tflite_model: Path) -> None:
    deploy_v1(fleet)
    manifest = fleet.peer.manifest(
        DEVICE, tflite_model, version=2, kind=VariantKind.TFLITE_INT8,
        runtime=RuntimeRequirement(runtime=Runtime.LITERT, targets=("edgetpu",),
                                   cpu_fallback=False))
    status = fleet.peer.final_status(DEVICE, fleet.peer.deploy(DEVICE, manifest))
    assert status.state.value == "failed"
    assert "edgetpu: unavailable" in status.reason
    fleet.serving(1)


def test_a_redelivered_deploy_is_executed_once(fleet: Fleet, int8_model: Path) -> None:
    deploy_v1(fleet)
    manifest = fleet.peer.manifest(DEVICE, int8_model, version=2, kind=VariantKind.ONNX_INT8)
    signed = sign_manifest(manifest, fleet.peer.key)
    from edgefleet.contract import DeployCommand, encode

    command = DeployCommand(command_id="dup-1", ts=time.time(), manifest=msgspec.Raw(signed),
                            watch_s=1.0)
    topic = fleet.peer.schema.command(DEVICE, CommandKind.DEPLOY)
    fleet.peer.send_raw(topic, encode(command))
    fleet.peer.send_raw(topic, encode(command))
    assert fleet.peer.final_status(DEVICE, "dup-1").state.value == "succeeded"
    time.sleep(1.5)
    finals = [s for s in fleet.peer.statuses(DEVICE, "dup-1") if s.state.value == "succeeded"]
    accepted = [s for s in fleet.peer.statuses(DEVICE, "dup-1") if s.state.value == "accepted"]
    assert len(finals) == 1 and len(accepted) == 1


def test_a_config_command_out_of_range_is_refused_and_a_good_one_applies_at_once(
        fleet: Fleet) -> None:
    deploy_v1(fleet)
    # A huge heartbeat interval once silenced an agent for good. (NaN and infinity cannot
    # arrive: JSON has neither, msgspec refuses 1e999, and MessagePack is refused here.)
    for command_id, interval in (("cfg-huge", 2.0**64), ("cfg-negative", -1.0),
                                 ("cfg-tiny", 0.001)):
        fleet.peer.send(DEVICE, CommandKind.CONFIG, ConfigCommand(
            command_id=command_id, ts=time.time(), heartbeat_interval_s=interval))
        status = fleet.peer.final_status(DEVICE, command_id)
        assert status.state.value == "rejected" and "out of range" in status.reason, status
    # A long interval then a short one: the short one takes effect without waiting out the
    # long one.
    for command_id, interval in (("cfg-long", 3600.0), ("cfg-short", 0.2)):
        fleet.peer.send(DEVICE, CommandKind.CONFIG, ConfigCommand(
            command_id=command_id, ts=time.time(), telemetry_interval_s=interval))
        assert fleet.peer.final_status(DEVICE, command_id).state.value == "succeeded"
    count = len(fleet.peer.telemetry(DEVICE))
    time.sleep(2.0)
    assert len(fleet.peer.telemetry(DEVICE)) - count >= 4
