"""The `edgefleet` operator CLI against a real SQLite fleet database in tmp_path: init, devices,
models, variants, rollouts, fleet status, telemetry and serve, each with the errors an operator
meets (unknown names, bad thresholds, no home, an unreachable database or broker) giving one
clear message, a non-zero exit and nothing half-changed.

Devices are seeded the way `edgefleet serve` stores them: ingest's writers fed real contract
payloads, with hardware facts read from the committed fake roots and matched to the shipped
profiles, so plans and selection see realistic devices.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from controller.db import current_revision, head_revision, make_engine
from controller.db.ingest import FactsWriter, PresenceWriter, TelemetryWriter, WriteResult
from controller.settings import load_settings
from edgefleet.contract import (
    ActiveModel,
    DeviceFacts,
    LatencyStats,
    Presence,
    PresenceState,
    RuntimeFact,
    TelemetryBatch,
    VariantKind,
    encode,
)
from edgefleet.hardware import load_profiles, match_profile, read_hardware
from tests.broker import free_ports
from tests.cli_helpers import as_json, copy_home, invoke, ok, query, refused
from tests.variants_helpers import DATA, SOURCE

REPO = Path(__file__).resolve().parents[1]
FAKEROOTS = Path(__file__).parent / "fakeroots"
T0 = 1_795_000_000.0
SEQ0 = 1_795_000_000_000
# device id -> fake root it runs on; unknown-riscv matches no profile.
DEVICES = {"x86-0": "x86-64", "rpi4-1": "rpi4", "coral-2": "coral-usb-rpi4",
           "riscv-3": "unknown-riscv"}
RUNTIMES = (
    RuntimeFact(name="onnxruntime", available=True, version="1.17.3", module="onnxruntime",
                targets=("CPUExecutionProvider",)),
    RuntimeFact(name="litert", available=True, version="2.3.0", module="ai_edge_litert",
                targets=("cpu",), missing=("edgetpu: unavailable: libedgetpu.so.1 not found",)),
)
FP32_ONLY = ("--only", "onnx-fp32")
UNREACHABLE = "postgresql://postgres:hunter2@127.0.0.1:1/nowhere"


@pytest.fixture(autouse=True)
def _no_leftover_wal(tmp_path: Path) -> Iterator[None]:
    """Every engine a command opens is disposed: no SQLite connection outlives a test."""
    yield
    assert not list(tmp_path.rglob("*.db-shm")), "an engine was left open"


# --- running the CLI -----------------------------------------------------------------------------

def execute(home: Path, sql: str, **params: Any) -> None:
    engine = make_engine(load_settings(home).database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def count(home: Path, table: str, where: str = "1 = 1") -> int:
    return int(query(home, f"SELECT COUNT(*) AS n FROM {table} WHERE {where}")[0]["n"])


def files_under(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mode: a before/after picture."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a seeded fleet ------------------------------------------------------------------------------

def facts(device_id: str, root: str) -> DeviceFacts:
    hardware = read_hardware(FAKEROOTS / root)
    match = match_profile(hardware, load_profiles())
    return DeviceFacts(device_id=device_id, ts=T0, hardware=hardware, runtimes=RUNTIMES,
                       profile=match.profile.name if match.profile else None,
                       agent_version="0.1.0")


def window(device_id: str, n: int) -> TelemetryBatch:
    return TelemetryBatch(
        device_id=device_id, seq=SEQ0 + n, window_start=T0 + 10 * n, window_end=T0 + 10 * n + 10,
        model=ActiveModel(model_name="digits", model_version=1,
                          variant_kind=VariantKind.ONNX_FP32, artifact_id="digits-v1-onnx-fp32"),
        execution="onnxruntime/CPUExecutionProvider", inferences=500, errors=1,
        throughput_ips=50.0, latency=LatencyStats(p50_ms=0.5, p95_ms=0.75, p99_ms=1.0,
                                                  max_ms=2.0),
        labelled=400, accuracy=0.98, agreement=0.99, cpu_percent=11.5, rss_mb=60.0)


def seed_devices(home: Path) -> None:
    """Presence, facts and telemetry stored by ingest's writers, as `serve` stores them."""
    engine = make_engine(load_settings(home).database_url)
    try:
        online = [(d, encode(Presence(device_id=d, state=PresenceState.ONLINE, ts=T0,
                                      agent_version="0.1.0"))) for d in DEVICES]
        assert PresenceWriter(engine).write(online) == WriteResult(stored=len(DEVICES))
        found = [(d, encode(facts(d, root))) for d, root in DEVICES.items()]
        assert FactsWriter(engine).write(found) == WriteResult(stored=len(DEVICES))
        windows = [("x86-0", encode(window("x86-0", n))) for n in range(3)]
        assert TelemetryWriter(engine).write(windows) == WriteResult(stored=3)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def seeded_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Initialised once per module: four devices (one of unknown hardware), telemetry for one,
    and digits v1 (onnx-fp32) registered. Tests work on copies of it."""
    home = tmp_path_factory.mktemp("template") / "home"
    ok("init", home=home)
    seed_devices(home)
    ok("models", "add", str(SOURCE), "--data", str(DATA), *FP32_ONLY, home=home)
    return home


@pytest.fixture
def fleet(seeded_template: Path, tmp_path: Path) -> Path:
    return copy_home(seeded_template, tmp_path / "fleet")


@pytest.fixture
def empty_home(tmp_path: Path) -> Path:
    home = tmp_path / "empty"
    ok("init", home=home)
    return home


def create(home: Path, *extra: str) -> str:
    out = ok("rollouts", "create", "--name", "first", "--model", "digits", "--version", "1",
             *extra, home=home)
    return out.split()[1]


# --- init ----------------------------------------------------------------------------------------

def test_init_creates_settings_a_private_signing_key_and_a_migrated_database(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = ok("init", "--broker-port", "18830", "--topic-root", "acme", home=home)

    settings = load_settings(home)
    assert settings.database_url == f"sqlite:///{home.resolve() / 'fleet.db'}"
    assert (settings.broker.port, settings.broker.topic_root) == (18830, "acme")
    key = home / "keys" / "signing-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (home / "keys").stat().st_mode & 0o777 == 0o700
    assert (home / "keys" / "signing-key.pub.pem").read_bytes().startswith(b"-----BEGIN")
    assert current_revision(settings.database_url) == head_revision()
    assert (home / "artifacts").is_dir()
    assert "signing key" in out and str(home / "keys" / "signing-key.pub.pem") in out


def test_a_second_init_refuses_to_replace_the_key_and_changes_nothing(empty_home: Path) -> None:
    before = files_under(empty_home)

    result = invoke("init", "--broker-port", "1999", "--database-url",
                    f"sqlite:///{empty_home / 'other.db'}", home=empty_home)

    refused(result, "signing-key.pem", "refusing to replace")
    assert files_under(empty_home) == before


def test_init_with_an_unreachable_database_leaves_no_key_so_it_can_be_run_again(
        tmp_path: Path) -> None:
    home = tmp_path / "home"

    line = refused(invoke("init", "--database-url", UNREACHABLE, home=home),
                   "127.0.0.1:1/nowhere", "unavailable")

    assert "hunter2" not in line
    assert files_under(home) == {}
    ok("init", home=home)  # once the database is there, init works: no key was left behind
    assert (home / "keys" / "signing-key.pem").exists()


@pytest.mark.parametrize("url", ["nonsense", "mysql://root:hunter2@localhost/fleet"])
def test_init_with_a_database_url_it_cannot_use_says_so(tmp_path: Path, url: str) -> None:
    line = refused(invoke("init", "--database-url", url, home=tmp_path / "home"), "database")
    assert "hunter2" not in line
    assert files_under(tmp_path / "home") == {}


# --- no home -------------------------------------------------------------------------------------

EVERY_COMMAND = [
    ("devices", "list"), ("devices", "show", "x86-0"), ("devices", "label", "x86-0", "a=b"),
    ("models", "add", "model.onnx", "--data", "data.npz"), ("models", "list"),
    ("variants", "list"),
    ("rollouts", "create", "--name", "r", "--model", "digits", "--version", "1"),
    ("rollouts", "start", "ro-0001"), ("rollouts", "pause", "ro-0001"),
    ("rollouts", "resume", "ro-0001"), ("rollouts", "abort", "ro-0001"),
    ("rollouts", "status"), ("rollouts", "status", "ro-0001", "--watch"),
    ("fleet", "status"), ("telemetry", "show", "x86-0"), ("serve",),
]
COMMAND_IDS = ["-".join(c[:2]) for c in EVERY_COMMAND]


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=COMMAND_IDS)
def test_every_command_without_a_home_says_to_run_init(
        command: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default home is ./edgefleet-home: not there

    refused(invoke(*command, env={"EDGEFLEET_HOME": None}), "edgefleet init")

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=COMMAND_IDS)
def test_every_command_with_a_home_without_settings_says_to_run_init(
        command: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    refused(invoke(*command, home=tmp_path / "home"), "controller.toml", "edgefleet init")
    assert list((tmp_path / "home").iterdir()) == []


def test_a_home_whose_database_file_is_gone_says_to_run_init_and_creates_none(
        empty_home: Path) -> None:
    (empty_home / "fleet.db").unlink()
    refused(invoke("devices", "list", home=empty_home), "does not exist", "edgefleet init")
    assert not (empty_home / "fleet.db").exists()


def test_a_database_without_the_tables_says_to_run_init(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sqlite3.connect(home / "bare.db").close()
    (home / "controller.toml").write_text(f'database_url = "sqlite:///{home / "bare.db"}"\n')
    refused(invoke("models", "list", home=home), "no edgefleet tables", "edgefleet init")


def test_a_database_from_a_newer_edgefleet_is_refused_naming_both_revisions(
        empty_home: Path) -> None:
    execute(empty_home, "UPDATE alembic_version SET version_num = '9999_future'")
    refused(invoke("devices", "list", home=empty_home), "9999_future", head_revision())
    refused(invoke("serve", home=empty_home), "cannot migrate")


# --- an unreachable database ---------------------------------------------------------------------

@pytest.mark.parametrize("url", [UNREACHABLE, "postgresql://postgres@127.0.0.1:1/nowhere"],
                         ids=["with-password", "without-password"])
@pytest.mark.parametrize("command", EVERY_COMMAND, ids=COMMAND_IDS)
def test_an_unreachable_database_is_one_message_naming_the_url_without_its_password(
        command: tuple[str, ...], url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "controller.toml").write_text(f'database_url = "{url}"\n')

    line = refused(invoke(*command, home=home), "postgres", "@127.0.0.1:1/nowhere",
                   "unavailable")

    assert "hunter2" not in line
    assert list(home.iterdir()) == [home / "controller.toml"]


# --- listings ------------------------------------------------------------------------------------

LISTINGS = [
    (("devices", "list"), list(DEVICES)),
    (("models", "list"), ["digits"]),
    (("variants", "list"), ["digits", "onnx-fp32"]),
    (("fleet", "status"), list(DEVICES)),
    (("rollouts", "status"), ["ro-0001"]),
    (("rollouts", "status", "ro-0001"), ["ro-0001", "canary"]),
    (("telemetry", "show", "x86-0"), [str(SEQ0 + n) for n in range(3)]),
]


@pytest.mark.parametrize(("command", "expected"), LISTINGS,
                         ids=["-".join(c) for c, _ in LISTINGS])
def test_every_listing_prints_json_and_a_table_with_the_rows(
        fleet: Path, command: tuple[str, ...], expected: list[str]) -> None:
    create(fleet)

    rows = as_json(*command, home=fleet)
    table = ok(*command, home=fleet)

    assert isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)
    flat = json.dumps(rows)
    for value in expected:
        assert value in flat
        assert value in table


def test_listings_hold_what_ingest_stored(fleet: Path) -> None:
    devices = {d["id"]: d for d in as_json("devices", "list", home=fleet)}
    assert {d: devices[d]["profile"] for d in DEVICES} == {
        "x86-0": "x86-64", "rpi4-1": "rpi4", "coral-2": "coral-usb-rpi4", "riscv-3": None}
    assert all(d["online"] for d in devices.values())
    assert devices["x86-0"]["active_execution"] == "onnxruntime/CPUExecutionProvider"
    [shown] = as_json("devices", "show", "coral-2", home=fleet)
    assert shown["facts"]["hardware"]["usb_ids"]  # the Coral's USB id, from its fake root
    assert shown["facts"]["runtimes"][0]["name"] == "onnxruntime"
    telemetry = as_json("telemetry", "show", "x86-0", "--last", "2", home=fleet)
    assert [w["seq"] for w in telemetry] == [SEQ0 + 2, SEQ0 + 1]  # newest first
    assert as_json("telemetry", "show", "rpi4-1", home=fleet) == []
    [variant] = as_json("variants", "list", "--model", "digits", home=fleet)
    assert variant["kind"] == "onnx-fp32" and 0.9 < variant["accuracy"] <= 1
    assert as_json("variants", "list", "--model", "other", home=fleet) == []


def test_telemetry_show_refuses_a_count_below_one(fleet: Path) -> None:
    refused(invoke("telemetry", "show", "x86-0", "--last", "0", home=fleet), "--last", code=2)


# --- devices -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [("devices", "show", "ghost-9"),
                                     ("devices", "label", "ghost-9", "site=lab"),
                                     ("telemetry", "show", "ghost-9")],
                         ids=["show", "label", "telemetry"])
def test_an_unknown_device_is_a_clear_error(fleet: Path, command: tuple[str, ...]) -> None:
    refused(invoke(*command, home=fleet), "unknown device", "ghost-9")
    assert count(fleet, "audit_log", "action = 'device.label'") == 0
    assert count(fleet, "devices", "id = 'ghost-9'") == 0


@pytest.mark.parametrize("labels", [("tier",), ("=canary",), ("site=lab", "oops")],
                         ids=["no-equals", "no-key", "one-bad-of-two"])
def test_a_label_with_bad_syntax_changes_nothing(fleet: Path, labels: tuple[str, ...]) -> None:
    refused(invoke("devices", "label", "x86-0", *labels, home=fleet), "key=value")
    assert query(fleet, "SELECT labels FROM devices WHERE id = 'x86-0'")[0]["labels"] == "{}"
    assert count(fleet, "audit_log", "action = 'device.label'") == 0


def test_labels_are_added_and_removed_and_audited(fleet: Path) -> None:
    ok("devices", "label", "x86-0", "site=lab", "tier=canary", home=fleet)
    ok("devices", "label", "x86-0", "tier=", home=fleet)

    [device] = as_json("devices", "show", "x86-0", home=fleet)
    assert device["labels"] == {"site": "lab"}
    audits = query(fleet, "SELECT actor, subject, detail FROM audit_log "
                          "WHERE action = 'device.label' ORDER BY id")
    assert [(a["actor"], a["subject"]) for a in audits] == [("operator", "x86-0")] * 2
    assert [json.loads(a["detail"])["labels"] for a in audits] == [
        {"site": "lab", "tier": "canary"}, {"site": "lab"}]
    assert [d["labels"] for d in as_json("devices", "list", home=fleet)
            if d["id"] != "x86-0"] == [{}] * 3


# --- models --------------------------------------------------------------------------------------

def _nothing_registered(home: Path) -> None:
    assert as_json("models", "list", home=home) == []
    assert as_json("variants", "list", home=home) == []
    assert count(home, "variants") == 0
    assert count(home, "audit_log", "action = 'model.add'") == 0
    assert list((home / "artifacts").iterdir()) == []


def test_a_corrupt_onnx_is_an_error_naming_the_file_and_registers_nothing(
        empty_home: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.onnx"
    corrupt.write_bytes(b"\x08\x07this is not a protobuf" * 10)

    refused(invoke("models", "add", str(corrupt), "--data", str(DATA), home=empty_home),
            "broken.onnx", "not an ONNX model")
    refused(invoke("models", "add", str(corrupt), "--data", str(DATA), "--name", "digits",
                   home=empty_home), "broken.onnx")

    _nothing_registered(empty_home)


def test_a_corrupt_data_file_is_an_error_naming_it_and_registers_nothing(
        empty_home: Path, tmp_path: Path) -> None:
    data = tmp_path / "eval.npz"
    data.write_bytes(b"PK not really a zip")
    refused(invoke("models", "add", str(SOURCE), "--data", str(data), home=empty_home),
            "eval.npz")
    _nothing_registered(empty_home)


def test_an_invalid_variant_kind_is_refused_before_anything_is_built(empty_home: Path) -> None:
    result = invoke("models", "add", str(SOURCE), "--data", str(DATA), "--only", "onnx-int4",
                    home=empty_home)
    refused(result, "--only", "'onnx-int4' is not one of", "onnx-fp32", code=2)
    _nothing_registered(empty_home)


def test_adding_a_model_twice_registers_versions_1_and_2(empty_home: Path) -> None:
    ok("models", "add", str(SOURCE), "--data", str(DATA), *FP32_ONLY, home=empty_home)
    out = ok("models", "add", str(SOURCE), "--data", str(DATA), *FP32_ONLY, "--only",
             "onnx-int8", home=empty_home)

    assert "registered digits v2: 2 variants" in out
    assert [(m["name"], m["version"]) for m in as_json("models", "list", home=empty_home)] == [
        ("digits", 1), ("digits", 2)]
    assert [(v["version"], v["kind"]) for v in as_json("variants", "list", home=empty_home)] == [
        (1, "onnx-fp32"), (2, "onnx-fp32"), (2, "onnx-int8")]
    for variant in query(empty_home, "SELECT file FROM variants"):
        assert Path(variant["file"]).is_file()
        assert Path(variant["file"]).parent.parent == (empty_home / "artifacts" / "digits"
                                                       ).resolve()
    assert count(empty_home, "audit_log", "action = 'model.add'") == 2


def test_a_version_below_the_newest_is_refused_and_changes_nothing(fleet: Path) -> None:
    ok("models", "add", str(SOURCE), "--data", str(DATA), *FP32_ONLY, "--version", "3",
       home=fleet)
    before = (as_json("models", "list", home=fleet), as_json("variants", "list", home=fleet),
              files_under(fleet / "artifacts"))

    refused(invoke("models", "add", str(SOURCE), "--data", str(DATA), *FP32_ONLY, "--version",
                   "2", home=fleet), "already has version 3", "got 2")

    assert (as_json("models", "list", home=fleet), as_json("variants", "list", home=fleet),
            files_under(fleet / "artifacts")) == before
    assert sorted(p.name for p in (fleet / "artifacts" / "digits").iterdir()) == ["v1", "v3"]


def test_the_same_source_under_another_name_gets_artifacts_of_that_name(fleet: Path) -> None:
    result = invoke("models", "add", str(SOURCE), "--data", str(DATA), *FP32_ONLY, "--name",
                    "other", home=fleet)
    assert result.exit_code == 0, result.output
    assert sorted(m["name"] for m in as_json("models", "list", home=fleet)) == ["digits",
                                                                               "other"]
    other = as_json("variants", "list", "--model", "other", home=fleet)
    assert [v["model"] for v in other] == ["other"]
    assert (fleet / "artifacts" / "other" / "v1").is_dir()


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


# --- serve ---------------------------------------------------------------------------------------

def test_serve_with_an_unreachable_broker_says_so_and_exits_within_seconds(
        tmp_path: Path) -> None:
    [port] = free_ports(1)  # free a moment ago; nothing listens there
    home = tmp_path / "home"
    ok("init", "--broker-port", str(port), home=home)
    started = time.monotonic()

    done = subprocess.run([sys.executable, "-c", "from controller.cli import main; main()",
                           "serve", "--home", str(home)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)

    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"Error: cannot reach the MQTT broker at 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert elapsed < 15
