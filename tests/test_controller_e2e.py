"""The controller end to end: `edgefleet serve`, real agents of four profiles with real models,
staged rollouts, a telemetry gate that trips, and a controller killed mid-rollout."""

from __future__ import annotations

from pathlib import Path

from tests.controlled_fleet import PROFILES, ControlledFleet
from tests.model_builders import constant_model
from tests.variants_helpers import DATA, SOURCE

QUICK = ("--only", "onnx-fp32", "--only", "onnx-int8")


def _roll_out(fleet: ControlledFleet, version: int, *extra: str) -> str:
    out = fleet.cli("rollouts", "create", "--name", f"v{version}", "--model", "digits",
                    "--version", str(version), "--watch", "1", *extra)
    rollout_id = out.split()[1]
    fleet.cli("rollouts", "start", rollout_id)
    return rollout_id


def _versions(fleet: ControlledFleet) -> dict[str, int | None]:
    return {r["device_id"]: r["model_version"] for r in fleet.json("fleet", "status")}


def _deploys_per_device(fleet: ControlledFleet, rollout_id: str) -> dict[str, int]:
    rows = fleet.query(
        "SELECT device_id, COUNT(DISTINCT command_id) AS n FROM command_statuses "
        "WHERE command_id LIKE :pattern AND state = 'accepted' GROUP BY device_id",
        pattern=f"{rollout_id}:%:deploy:%")
    return {r["device_id"]: r["n"] for r in rows}


def test_a_good_model_rolls_out_group_by_group(controlled_fleet: ControlledFleet) -> None:
    fleet = controlled_fleet
    fleet.cli("models", "add", str(SOURCE), "--data", str(DATA), *QUICK)
    rollout_id = _roll_out(fleet, 1, "--groups", "25,50,100")
    fleet.wait(lambda: fleet.rollout_state(rollout_id) == "succeeded", 90, "the rollout")
    groups = fleet.query("SELECT position, state, started_at FROM rollout_groups "
                         "WHERE rollout_id = :id ORDER BY position", id=rollout_id)
    assert [g["state"] for g in groups] == ["succeeded"] * 3
    assert [g["started_at"] for g in groups] == sorted(g["started_at"] for g in groups)
    fleet.wait(lambda: set(_versions(fleet).values()) == {1}, 20, "fleet status on v1")
    assert _deploys_per_device(fleet, rollout_id) == {f"{p}-{i}": 1
                                                      for i, p in enumerate(PROFILES)}
    progress = fleet.json("rollouts", "status", rollout_id)
    assert sum(g["succeeded"] for g in progress) == len(PROFILES)
    # Selection put CPU variants where no accelerator loads here, and said why.
    create = fleet.query("SELECT detail FROM audit_log WHERE action = 'rollout.create'")
    assert "tflite-int8 not chosen" in str(create[0]["detail"])


def test_a_worse_model_trips_the_accuracy_gate_and_devices_return(
        controlled_fleet: ControlledFleet, tmp_path: Path) -> None:
    fleet = controlled_fleet
    fleet.cli("models", "add", str(SOURCE), "--data", str(DATA), *QUICK)
    first = _roll_out(fleet, 1, "--groups", "100")
    fleet.wait(lambda: fleet.rollout_state(first) == "succeeded", 90, "v1 everywhere")
    worse = constant_model(tmp_path)                     # answers "0" to everything
    fleet.cli("models", "add", str(worse), "--data", str(DATA), "--name", "digits",
              "--only", "onnx-fp32")
    rollout_id = _roll_out(fleet, 2, "--groups", "50,100", "--soak", "2",
                           "--min-accuracy", "0.9", "--min-samples", "50",
                           "--on-gate-failure", "rollback")
    fleet.wait(lambda: fleet.rollout_state(rollout_id) in ("failed", "paused"), 120,
               "the gate to stop the rollout")
    gate = fleet.query("SELECT detail FROM audit_log WHERE subject = :id AND action LIKE "
                       "'engine.gate%' ORDER BY id", id=rollout_id)
    assert gate, "the gate decision is in the audit log"
    assert "accuracy" in str(gate[-1]["detail"])
    canary = fleet.query("SELECT device_id FROM deployments WHERE rollout_id = :id AND "
                         "group_position = 0", id=rollout_id)
    rest = fleet.query("SELECT state FROM deployments WHERE rollout_id = :id AND "
                       "group_position = 1", id=rollout_id)
    assert all(r["state"] in ("pending", "cancelled") for r in rest)   # never reached
    fleet.wait(lambda: all(_versions(fleet)[c["device_id"]] == 1 for c in canary), 60,
               "the canary back on v1")
    assert set(_versions(fleet).values()) == {1}


def test_a_controller_killed_mid_rollout_finishes_without_deploying_twice(
        controlled_fleet: ControlledFleet) -> None:
    fleet = controlled_fleet
    fleet.cli("models", "add", str(SOURCE), "--data", str(DATA), *QUICK)
    rollout_id = _roll_out(fleet, 1, "--groups", "25,50,75,100", "--soak", "1.5")
    fleet.wait(lambda: len(_deploys_per_device(fleet, rollout_id)) >= 1, 60,
               "the first device to accept")
    fleet.kill_serve()
    fleet.start_serve()
    fleet.wait(lambda: fleet.rollout_state(rollout_id) == "succeeded", 120,
               "the rollout after the restart")
    assert fleet.serve_starts == 2
    assert _deploys_per_device(fleet, rollout_id) == {f"{p}-{i}": 1
                                                      for i, p in enumerate(PROFILES)}
    attempts = fleet.query("SELECT attempts FROM deployments WHERE rollout_id = :id",
                           id=rollout_id)
    assert {a["attempts"] for a in attempts} == {1}
