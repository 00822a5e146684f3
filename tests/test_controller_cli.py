"""The `edgefleet` operator CLI against a real SQLite fleet database in tmp_path: init, devices,
models, variants, fleet status, telemetry and serve, each with the errors an operator meets
(unknown names, no home, an unreachable database or broker) giving one clear message, a
non-zero exit and nothing half-changed. Rollouts have a file of their own
(test_controller_cli_rollouts.py); the seeded fleet is tests/cli_fleet.py.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.db import current_revision, head_revision
from controller.settings import load_settings
from tests.broker import free_ports
from tests.cli_fleet import (
    DEVICES,
    FP32_ONLY,
    REPO,
    SEQ0,
    UNREACHABLE,
    count,
    create,
    execute,
    files_under,
)
from tests.cli_helpers import as_json, copy_home, invoke, ok, query, refused
from tests.variants_helpers import DATA, SOURCE

pytestmark = pytest.mark.usefixtures("no_leftover_wal")


@pytest.fixture
def fleet(seeded_cli_template: Path, tmp_path: Path) -> Path:
    return copy_home(seeded_cli_template, tmp_path / "fleet")


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
