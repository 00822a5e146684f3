"""`edgefleet rollouts create|start|pause|resume|abort|status` against a real SQLite fleet
database: plans, bad thresholds, targets no device can run, and requests queued for serve, each
error one clear message with nothing half-changed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.cli_fleet import (
    DEVICES,
    count,
    create,
    execute,
)
from tests.cli_helpers import copy_home, invoke, ok, query, refused

pytestmark = pytest.mark.usefixtures("no_leftover_wal")


@pytest.fixture
def fleet(seeded_cli_template: Path, tmp_path: Path) -> Path:
    return copy_home(seeded_cli_template, tmp_path / "fleet")


# --- rollouts: create ----------------------------------------------------------------------------

def _no_rollout(home: Path) -> None:
    assert count(home, "rollouts") == 0
    assert count(home, "rollout_groups") == 0
    assert count(home, "deployments") == 0
    assert count(home, "audit_log", "action LIKE 'rollout.%'") == 0


BAD_OPTIONS = [
    (("--success-threshold", "150"), "success_threshold_percent must be within 0..100"),
    (("--success-threshold", "nan"), "success_threshold_percent"),
    (("--error-threshold", "-1"), "error_threshold_percent must be within 0..100"),
    (("--max-retries", "-1"), "max_retries must be an integer >= 0"),
    (("--groups", "50,20"), "increasing"),
    (("--groups", "abc"), "comma-separated percentages"),
    (("--groups", "10,50"), "the last group must reach 100%"),
    (("--groups", "0,100"), "(0, 100]"),
    (("--rate", "0"), "max_starts_per_minute"),
    (("--timeout", "0"), "in_progress_timeout_s"),
    (("--soak", "-5"), "soak_s"),
    (("--min-accuracy", "1.5"), "gates.min_accuracy"),
    (("--min-samples", "0"), "min_samples"),
    (("--device-min-accuracy", "95"), "--device-min-accuracy must be within 0..1"),
    (("--min-accuracy-variant", "-0.1"), "--min-accuracy-variant must be within 0..1"),
    (("--watch", "-1"), "--watch"),
    (("--watch", "0"), "--watch must be greater than 0"),
    (("--label", "tier"), "labels are key=value"),
]


@pytest.mark.parametrize(("options", "says"), BAD_OPTIONS,
                         ids=["=".join(o).lstrip("-") for o, _ in BAD_OPTIONS])
def test_a_bad_threshold_is_one_message_and_creates_no_rollout(
        fleet: Path, options: tuple[str, ...], says: str) -> None:
    result = invoke("rollouts", "create", "--name", "r", "--model", "digits", "--version", "1",
                    *options, home=fleet)
    refused(result, says)
    _no_rollout(fleet)


@pytest.mark.parametrize(("options", "says"), [
    (("--model", "nosuch", "--version", "1"), "unknown model nosuch version 1"),
    (("--model", "digits", "--version", "7"), "unknown model digits version 7"),
    (("--model", "digits", "--version", "1", "--profile", "jetson-nano"),
     "the target matches no registered device"),
    (("--model", "digits", "--version", "1", "--label", "site=mars"),
     "the target matches no registered device"),
    (("--model", "digits", "--version", "1", "--device", "ghost-9", "--device", "x86-0"),
     "unknown devices: ghost-9"),
    (("--model", "digits", "--version", "1", "--device", "x86-0", "--profile", "rpi4"),
     "x86-0 do not match the profiles or labels"),
], ids=["unknown-model", "unknown-version", "no-device-of-profile", "no-device-with-label",
        "unknown-device", "device-left-out-by-profile"])
def test_a_rollout_of_nothing_known_is_refused_and_creates_nothing(
        fleet: Path, options: tuple[str, ...], says: str) -> None:
    refused(invoke("rollouts", "create", "--name", "r", *options, home=fleet), says)
    _no_rollout(fleet)


def test_a_created_rollout_is_a_draft_with_a_deployment_per_device_and_the_reasons(
        fleet: Path) -> None:
    out = ok("rollouts", "create", "--name", "first", "--model", "digits", "--version", "1",
             "--groups", "25,100", "--device-min-accuracy", "0.9", home=fleet)

    assert out.startswith("created ro-0001 (first)")
    assert "edgefleet rollouts start ro-0001" in out
    [rollout] = query(fleet, "SELECT * FROM rollouts")
    assert (rollout["id"], rollout["name"], rollout["state"]) == ("ro-0001", "first", "draft")
    assert json.loads(rollout["config"])["min_accuracy"] == 0.9
    deployments = {d["device_id"]: d for d in query(
        fleet, "SELECT d.device_id, d.state, d.reason, d.group_position, v.kind "
               "FROM deployments d LEFT JOIN variants v ON v.id = d.variant_id")}
    assert set(deployments) == set(DEVICES)
    unknown = deployments.pop("riscv-3")
    assert unknown["kind"] is None and unknown["state"] == "skipped"
    assert unknown["group_position"] == 1  # the last group: the canary holds no skipped device
    assert "unknown hardware" in unknown["reason"]
    assert {d["kind"] for d in deployments.values()} == {"onnx-fp32"}
    assert {d["state"] for d in deployments.values()} == {"pending"}
    assert [g["name"] for g in query(fleet, "SELECT name FROM rollout_groups ORDER BY position")
            ] == ["canary", "group-2"]
    [audit] = query(fleet, "SELECT actor, subject, detail FROM audit_log "
                           "WHERE action = 'rollout.create'")
    detail = json.loads(audit["detail"])
    assert (audit["actor"], audit["subject"], detail["devices"]) == ("operator", "ro-0001", 4)
    assert set(detail["selection"]) == set(DEVICES)
    assert "unknown hardware" in detail["selection"]["riscv-3"]
    assert all(why for why in detail["selection"].values())
    assert "riscv-3: unknown hardware" in out


def test_the_canary_counts_only_devices_that_get_the_model(fleet: Path) -> None:
    # By id, riscv-3 (unknown hardware) comes first: it must not be the whole canary.
    create(fleet, "--device", "riscv-3", "--device", "rpi4-1", "--device", "x86-0",
           "--groups", "34,100")

    groups = query(fleet, "SELECT group_position, device_id, state FROM deployments "
                          "ORDER BY group_position, device_id")
    assert [(g["group_position"], g["device_id"], g["state"]) for g in groups] == [
        (0, "rpi4-1", "pending"), (1, "riscv-3", "skipped"), (1, "x86-0", "pending")]


def test_a_rollout_no_targeted_device_can_run_is_refused_with_the_reasons(fleet: Path) -> None:
    refused(invoke("rollouts", "create", "--name", "r", "--model", "digits", "--version", "1",
                   "--device", "riscv-3", home=fleet),
            "no targeted device can run digits v1", "riscv-3: unknown hardware")
    _no_rollout(fleet)


def test_a_rollout_can_target_by_label_and_profile(fleet: Path) -> None:
    ok("devices", "label", "rpi4-1", "site=lab", home=fleet)
    ok("devices", "label", "coral-2", "site=lab", home=fleet)

    create(fleet, "--label", "site=lab", "--profile", "rpi4")

    assert [d["device_id"] for d in query(fleet, "SELECT device_id FROM deployments")] == [
        "rpi4-1"]


# --- rollouts: requests --------------------------------------------------------------------------

ACTIONS = ("start", "pause", "resume", "abort")


@pytest.mark.parametrize("action", ACTIONS)
def test_a_request_for_an_unknown_rollout_is_an_error(fleet: Path, action: str) -> None:
    refused(invoke("rollouts", action, "ro-0042", home=fleet), "unknown rollout", "ro-0042")
    assert count(fleet, "rollout_requests") == 0


@pytest.mark.parametrize("state", ["succeeded", "aborted", "failed"])
@pytest.mark.parametrize("action", ACTIONS)
def test_a_request_for_a_finished_rollout_is_an_error(fleet: Path, action: str,
                                                      state: str) -> None:
    rollout_id = create(fleet)
    execute(fleet, "UPDATE rollouts SET state = :state", state=state)

    refused(invoke("rollouts", action, rollout_id, home=fleet), rollout_id, state)

    assert count(fleet, "rollout_requests") == 0
    assert count(fleet, "audit_log", "action = 'rollout.create'") == 1
    assert count(fleet, "audit_log", "action LIKE 'rollout.%'") == 1


@pytest.mark.parametrize(("state", "queued", "action"), [
    ("draft", (), "start"),
    ("draft", (), "abort"),
    ("draft", ("start",), "pause"),     # start is queued: by then it runs
    ("running", (), "pause"),
    ("running", (), "abort"),
    ("paused", (), "resume"),
    ("paused", (), "abort"),
])
def test_a_valid_request_is_queued_for_serve_and_audited(
        fleet: Path, state: str, queued: tuple[str, ...], action: str) -> None:
    rollout_id = create(fleet)
    execute(fleet, "UPDATE rollouts SET state = :state", state=state)
    for earlier in queued:
        ok("rollouts", earlier, rollout_id, home=fleet)

    out = ok("rollouts", action, rollout_id, "--reason", "ticket 12", home=fleet)

    assert f"{action} requested" in out
    requests = query(fleet, "SELECT rollout_id, action, reason, processed_at "
                            "FROM rollout_requests ORDER BY id")
    assert requests[-1] == {"rollout_id": rollout_id, "action": action, "reason": "ticket 12",
                            "processed_at": None}
    [audit] = query(fleet, "SELECT actor, subject, detail FROM audit_log WHERE action = :a",
                    a=f"rollout.{action}")
    assert (audit["actor"], audit["subject"]) == ("operator", rollout_id)
    assert json.loads(audit["detail"]) == {"reason": "ticket 12"}


@pytest.mark.parametrize(("state", "queued", "action"), [
    ("draft", (), "resume"),
    ("draft", (), "pause"),
    ("running", (), "start"),
    ("running", (), "resume"),
    ("paused", (), "pause"),
    ("draft", ("abort",), "start"),     # an abort is queued: it will be aborted
], ids=["resume-draft", "pause-draft", "start-running", "resume-running", "pause-paused",
        "start-after-queued-abort"])
def test_a_request_the_engine_would_refuse_is_refused_here_and_not_queued(
        fleet: Path, state: str, queued: tuple[str, ...], action: str) -> None:
    rollout_id = create(fleet)
    execute(fleet, "UPDATE rollouts SET state = :state", state=state)
    for earlier in queued:
        ok("rollouts", earlier, rollout_id, home=fleet)

    refused(invoke("rollouts", action, rollout_id, home=fleet), f"cannot {action} ro-0001")

    assert count(fleet, "rollout_requests") == len(queued)
    assert count(fleet, "audit_log", f"action = 'rollout.{action}'") == 0


def test_rollouts_status_watch_returns_once_the_rollout_has_ended(fleet: Path) -> None:
    rollout_id = create(fleet)
    execute(fleet, "UPDATE rollouts SET state = 'succeeded'")
    started = time.monotonic()
    out = ok("rollouts", "status", rollout_id, "--watch", "--interval", "30", home=fleet)
    assert time.monotonic() - started < 10
    assert f"Rollout {rollout_id}: succeeded" in out
    assert "rollout.create" in out  # the latest audit entries follow the table
    refused(invoke("rollouts", "status", "ro-0042", "--watch", home=fleet), "unknown rollout")
