"""The operator's security commands against a real home in tmp_path: `init` making the fleet CA,
`broker-config` pointing the controller at TLS, `devices enroll|revoke`, `keys list|rotate`.
Each refusal is one `Error:` line, a non-zero exit and nothing half-written: no bundle files, no
device row, no certificate on record."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent.config import load_config
from controller.keys import key_chain
from controller.pki import CertificateKind, FleetCA
from edgefleet.contract.keylist import load_root, read_list
from tests.cli_helpers import copy_home, invoke, ok, query, refused

CONTROLLER = "edgefleet-controller"


# --- running the CLI -----------------------------------------------------------------------------

def audit(home: Path, action: str) -> list[dict[str, Any]]:
    rows = query(home, "SELECT subject, detail FROM audit_log WHERE action = :a ORDER BY id",
                 a=action)
    return [{**r, "detail": r["detail"] if isinstance(r["detail"], dict)
             else json.loads(r["detail"])} for r in rows]


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) \
        if folder.exists() else []


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def raw_settings(home: Path) -> dict[str, Any]:
    return tomllib.loads((home / "controller.toml").read_text())


# --- homes ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("initialised") / "home"
    ok("init", "--topic-root", "acme/fleet", home=home)
    return home


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory, initialised: Path) -> Path:
    home = copy_home(initialised, tmp_path_factory.mktemp("configured") / "home")
    ok("broker-config", "--port", "18883", "--hostname", "mqtt.example.internal", home=home)
    return home


@pytest.fixture
def bare(initialised: Path, tmp_path: Path) -> Path:
    """Initialised, no broker-config yet."""
    return copy_home(initialised, tmp_path / "home")


@pytest.fixture
def home(configured: Path, tmp_path: Path) -> Path:
    """Initialised and broker-config'd, no device enrolled."""
    return copy_home(configured, tmp_path / "home")


# --- init --------------------------------------------------------------------------------------

def test_init_creates_the_fleet_ca_and_the_controller_identity(bare: Path) -> None:
    pki = bare / "pki"

    assert mode(pki / "ca.key") == 0o600
    assert mode(pki / "controller.key") == 0o600
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((pki / "controller.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CONTROLLER
    assert cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "controller"
    records = FleetCA.load(pki).records()
    assert [(r.common_name, r.kind, r.serial) for r in records] == [
        (CONTROLLER, CertificateKind.CONTROLLER, cert.serial_number)]
    assert (pki / "crl.pem").exists()


def test_init_says_what_comes_next(tmp_path: Path) -> None:
    out = ok("init", home=tmp_path / "home")

    assert "fleet CA" in out and "broker-config" in out and "devices enroll" in out


# --- broker-config -------------------------------------------------------------------------------

def test_broker_config_points_the_controller_at_the_tls_broker(bare: Path) -> None:
    before = raw_settings(bare)

    out = ok("broker-config", "--port", "18883", "--hostname", "mqtt.example.internal",
             "--observer", "probe", home=bare)

    broker = raw_settings(bare)["broker"]
    assert (broker["host"], broker["port"]) == ("mqtt.example.internal", 18883)
    assert (broker["ca_file"], broker["cert_file"], broker["key_file"]) == (
        "pki/ca.crt", "pki/controller.crt", "pki/controller.key")
    assert broker["topic_root"] == before["broker"]["topic_root"] == "acme/fleet"
    assert broker["client_id"] == CONTROLLER
    assert raw_settings(bare)["database_url"] == before["database_url"]
    conf = (bare / "broker" / "mosquitto.conf").resolve()
    assert f"mosquitto -c {conf}" in out.replace("\n", " ")
    assert "probe" in out and CONTROLLER in out
    assert files_in(bare / "broker") == ["acl", "mosquitto.conf", "probe.crt", "probe.key",
                                         "server.crt", "server.key"]
    assert "acme/fleet/dev/%u/telemetry" in (bare / "broker" / "acl").read_text()
    assert mode(bare / "broker" / "probe.key") == 0o600


def test_broker_config_listening_everywhere_tells_the_controller_to_use_loopback(
        bare: Path, tmp_path: Path) -> None:
    ok("broker-config", "--bind", "0.0.0.0", "--port", "8883", "--out",
       str(tmp_path / "elsewhere"), home=bare)

    broker = raw_settings(bare)["broker"]
    assert (broker["host"], broker["port"]) == ("127.0.0.1", 8883)
    assert "listener 8883 0.0.0.0" in (tmp_path / "elsewhere" / "mosquitto.conf").read_text()
    assert not (bare / "broker").exists()


def test_broker_config_in_a_home_made_before_the_ca_creates_it(bare: Path) -> None:
    shutil.rmtree(bare / "pki")

    ok("broker-config", "--port", "18883", home=bare)

    pki = bare / "pki"
    assert mode(pki / "ca.key") == 0o600 and mode(pki / "controller.key") == 0o600
    kinds = {(r.common_name, r.kind) for r in FleetCA.load(pki).records()}
    assert (CONTROLLER, CertificateKind.CONTROLLER) in kinds
    assert f"user {CONTROLLER}" in (bare / "broker" / "acl").read_text()


def test_broker_config_issues_identities_for_more_controllers(bare: Path) -> None:
    ok("broker-config", "--controller", "serve-2", home=bare)

    acl = (bare / "broker" / "acl").read_text()
    assert f"user {CONTROLLER}" in acl and "user serve-2" in acl
    assert mode(bare / "broker" / "serve-2.key") == 0o600
    cert = x509.load_pem_x509_certificate((bare / "broker" / "serve-2.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "controller"


def test_a_refused_broker_config_leaves_the_broker_and_the_settings_as_they_were(
        home: Path) -> None:
    broker = {name: (home / "broker" / name).read_bytes()
              for name in files_in(home / "broker")}
    settings = raw_settings(home)
    records = FleetCA.load(home / "pki").records()

    # An observer may not take the controller's name: refused, and nothing may change, above
    # all not the broker's certificate, which the unchanged config and settings still expect
    # to name mqtt.example.internal.
    refused(invoke("broker-config", "--port", "18883", "--hostname", "new.example",
                   "--observer", CONTROLLER, home=home), CONTROLLER)

    assert raw_settings(home) == settings
    assert {name: (home / "broker" / name).read_bytes()
            for name in files_in(home / "broker")} == broker
    assert FleetCA.load(home / "pki").records() == records


def test_broker_config_with_a_bad_port_is_a_usage_error(bare: Path) -> None:
    result = invoke("broker-config", "--port", "70000", home=bare)

    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (bare / "broker").exists()


# --- devices enroll ------------------------------------------------------------------------------

def test_enroll_writes_a_bundle_that_loads_as_an_agent_config(home: Path) -> None:
    out = ok("devices", "enroll", "pi-0001", "--label", "site=berlin", "--label", "row=3",
             home=home)

    bundle = home / "enrollments" / "pi-0001"
    assert str(bundle.resolve()) in out.replace("\n", "")
    assert files_in(bundle) == ["agent.toml", "ca.crt", "device.crt", "device.key",
                                "key-chain.json"]
    assert mode(bundle / "device.key") == 0o600
    config = load_config(bundle / "agent.toml")
    assert config.device_id == "pi-0001"
    assert (config.broker.host, config.broker.port, config.broker.topic_root) == (
        "mqtt.example.internal", 18883, "acme/fleet")
    folder = bundle.resolve()
    assert (config.broker.ca_file, config.broker.cert_file, config.broker.key_file) == (
        folder / "ca.crt", folder / "device.crt", folder / "device.key")
    assert config.trust.root_file == folder / "key-chain.json"
    assert load_root(config.trust.root_file.read_bytes()).version == 1
    assert (bundle / "ca.crt").read_bytes() == (home / "pki" / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((bundle / "device.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-0001"


def test_enroll_registers_the_device_with_its_labels_and_audits_it(home: Path) -> None:
    ok("devices", "enroll", "pi-0001", "--label", "site=berlin", home=home)

    [device] = query(home, "SELECT id, labels FROM devices")
    labels = device["labels"] if isinstance(device["labels"], dict) else json.loads(
        device["labels"])
    assert (device["id"], labels) == ("pi-0001", {"site": "berlin"})
    [entry] = audit(home, "device.enroll")
    serial = FleetCA.load(home / "pki").records()[-1].serial
    assert entry["subject"] == "pi-0001"
    assert entry["detail"]["serial"] == str(serial)
    assert entry["detail"]["labels"] == {"site": "berlin"}


def test_enroll_takes_the_broker_host_out_folder_and_lifetime_given(home: Path,
                                                                    tmp_path: Path) -> None:
    out_dir = tmp_path / "usb-stick"

    ok("devices", "enroll", "pi-0002", "--out", str(out_dir), "--broker-host", "10.0.0.5",
       "--days", "30", home=home)

    assert load_config(out_dir / "agent.toml").broker.host == "10.0.0.5"
    cert = x509.load_pem_x509_certificate((out_dir / "device.crt").read_bytes())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() == pytest.approx(30 * 86_400, abs=1)
    assert not (home / "enrollments" / "pi-0002").exists()


def _nothing_enrolled(home: Path, records_before: int) -> None:
    assert query(home, "SELECT id FROM devices") == []
    assert audit(home, "device.enroll") == []
    assert len(FleetCA.load(home / "pki").records()) == records_before


def test_enroll_before_broker_config_says_to_run_it(bare: Path) -> None:
    records = len(FleetCA.load(bare / "pki").records())

    refused(invoke("devices", "enroll", "pi-0001", home=bare), "broker-config")

    assert files_in(bare / "enrollments") == []
    _nothing_enrolled(bare, records)


@pytest.mark.parametrize("device_id", ["site/pi-0001", "pi 0001", ".hidden", "x" * 65, "pi+"])
def test_enroll_refuses_an_invalid_device_id(home: Path, device_id: str) -> None:
    records = len(FleetCA.load(home / "pki").records())

    refused(invoke("devices", "enroll", device_id, home=home), "device id")

    assert files_in(home / "enrollments") == []
    _nothing_enrolled(home, records)


def test_enroll_refuses_a_folder_that_holds_a_bundle_and_leaves_it_alone(
        home: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "old-bundle"
    out_dir.mkdir()
    (out_dir / "agent.toml").write_text("# someone else's\n")
    records = len(FleetCA.load(home / "pki").records())

    refused(invoke("devices", "enroll", "pi-0001", "--out", str(out_dir), home=home),
            "agent.toml", "exists")

    assert files_in(out_dir) == ["agent.toml"]
    assert (out_dir / "agent.toml").read_text() == "# someone else's\n"
    _nothing_enrolled(home, records)


def test_enrolling_the_same_device_twice_refuses_to_overwrite_its_bundle(home: Path) -> None:
    ok("devices", "enroll", "pi-0001", home=home)
    bundle = home / "enrollments" / "pi-0001"
    key = (bundle / "device.key").read_bytes()

    refused(invoke("devices", "enroll", "pi-0001", home=home), "exists")

    assert (bundle / "device.key").read_bytes() == key
    assert len(audit(home, "device.enroll")) == 1


def test_enroll_refuses_the_controllers_name(home: Path) -> None:
    records = len(FleetCA.load(home / "pki").records())

    refused(invoke("devices", "enroll", CONTROLLER, home=home), CONTROLLER, "controller")

    assert files_in(home / "enrollments") == []
    _nothing_enrolled(home, records)


@pytest.mark.parametrize("label", ["site", "=berlin", "site="])
def test_enroll_refuses_a_label_that_is_not_key_value(home: Path, label: str) -> None:
    records = len(FleetCA.load(home / "pki").records())

    refused(invoke("devices", "enroll", "pi-0001", "--label", label, home=home), "key=value")

    assert files_in(home / "enrollments") == []
    _nothing_enrolled(home, records)


def test_enroll_of_a_device_already_known_merges_its_labels(home: Path) -> None:
    ok("devices", "enroll", "pi-0001", "--label", "site=berlin", "--out",
       str(home / "first"), home=home)
    ok("devices", "revoke", "pi-0001", home=home)

    ok("devices", "enroll", "pi-0001", "--label", "row=3", home=home)

    [device] = query(home, "SELECT labels FROM devices WHERE id = 'pi-0001'")
    labels = device["labels"] if isinstance(device["labels"], dict) else json.loads(
        device["labels"])
    assert labels == {"site": "berlin", "row": "3"}


# --- devices revoke ----------------------------------------------------------------------------

def test_revoke_puts_the_devices_serial_in_the_crl_and_audits_it(home: Path) -> None:
    ok("devices", "enroll", "pi-0001", home=home)
    ok("devices", "enroll", "pi-0002", home=home)
    records = {r.common_name: r.serial for r in FleetCA.load(home / "pki").records()}

    out = ok("devices", "revoke", "pi-0001", home=home)

    crl = x509.load_pem_x509_crl((home / "pki" / "crl.pem").read_bytes())
    assert [entry.serial_number for entry in crl] == [records["pi-0001"]]
    assert "restart the broker" in out or "SIGHUP" in out
    [entry] = audit(home, "device.revoke")
    assert (entry["subject"], entry["detail"]["serials"]) == ("pi-0001",
                                                               [str(records["pi-0001"])])


def test_revoking_twice_says_there_is_nothing_left_to_revoke(home: Path) -> None:
    ok("devices", "enroll", "pi-0001", home=home)
    ok("devices", "revoke", "pi-0001", home=home)
    crl = (home / "pki" / "crl.pem").read_bytes()

    refused(invoke("devices", "revoke", "pi-0001", home=home), "pi-0001", "no live")

    assert (home / "pki" / "crl.pem").read_bytes() == crl
    assert len(audit(home, "device.revoke")) == 1


@pytest.mark.parametrize("name", ["pi-9999", CONTROLLER])
def test_revoke_of_a_name_without_a_device_certificate_is_refused(home: Path,
                                                                  name: str) -> None:
    crl = (home / "pki" / "crl.pem").read_bytes()

    refused(invoke("devices", "revoke", name, home=home), name)

    assert (home / "pki" / "crl.pem").read_bytes() == crl
    assert audit(home, "device.revoke") == []


# --- keys --------------------------------------------------------------------------------------

def keys_list(home: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok("keys", "list", "--json", home=home))
    return rows


def test_keys_list_shows_the_first_list(home: Path) -> None:
    [row] = keys_list(home)

    first = read_list(key_chain(home / "keys")[0])
    assert (row["version"], row["active"], row["retired"]) == (
        1, first.keys[0].key_id, "")
    assert row["signed_by"] == first.keys[0].key_id


def test_keys_rotate_twice_gives_three_lists_each_naming_what_it_retired(home: Path) -> None:
    first = keys_list(home)[0]["active"]

    out = ok("keys", "rotate", home=home)
    second = keys_list(home)[-1]["active"]
    assert "version 2" in out and first in out and second in out and "retired" in out
    out = ok("keys", "rotate", home=home)

    rows = keys_list(home)
    assert [r["version"] for r in rows] == [1, 2, 3]
    third = rows[-1]["active"]
    assert "version 3" in out and second in out and third in out
    assert len({first, second, third}) == 3
    assert set(rows[-1]["retired"].split(", ")) == {first, second}
    assert set(rows[1]["signed_by"].split(", ")) == {first, second}
    assert [(e["detail"]["version"], e["detail"]["retired"]) for e in audit(
        home, "keys.rotate")] == [(2, first), (3, second)]
    # A device enrolled now starts from the newest list.
    ok("devices", "enroll", "pi-0001", home=home)
    chain = (home / "enrollments" / "pi-0001" / "key-chain.json").read_bytes()
    assert load_root(chain).version == 3


def test_keys_rotate_refuses_a_signing_key_others_can_read(home: Path) -> None:
    key = home / "keys" / "signing-key.pem"
    key.chmod(0o644)
    chain = (home / "keys" / "key-chain.json").read_bytes()

    refused(invoke("keys", "rotate", home=home), "chmod 600")

    assert (home / "keys" / "key-chain.json").read_bytes() == chain
    assert not (home / "keys" / "signing-key.next.pem").exists()
    assert audit(home, "keys.rotate") == []


def test_a_home_without_settings_is_refused_by_every_security_command(tmp_path: Path) -> None:
    for args in (("broker-config",), ("devices", "enroll", "pi-0001"),
                 ("devices", "revoke", "pi-0001"), ("keys", "list"), ("keys", "rotate")):
        refused(invoke(*args, home=tmp_path / "nowhere"), "edgefleet init")
    assert not (tmp_path / "nowhere").exists() or files_in(tmp_path / "nowhere") == []



def test_enroll_takes_labels_repeated_or_comma_separated(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok("init", home=home)
    ok("broker-config", "--port", "18884", home=home)
    ok("devices", "enroll", "pi-9", "--labels", "site=plant-7,tier=canary", "--label",
       "room=3", "--out", str(tmp_path / "pi-9"), home=home)
    rows = query(home, "SELECT labels FROM devices WHERE id = 'pi-9'")
    labels = rows[0]["labels"]
    labels = json.loads(labels) if isinstance(labels, str) else labels
    assert labels == {"site": "plant-7", "tier": "canary", "room": "3"}
    refused(invoke("devices", "enroll", "pi-10", "--labels", "site=a,oops", "--out",
                   str(tmp_path / "pi-10"), home=home), "key=value")
    assert not (tmp_path / "pi-10" / "device.key").exists()


def test_enrolling_for_a_host_the_broker_certificate_does_not_name_warns(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok("init", home=home)
    ok("broker-config", "--port", "18885", "--hostname", "mqtt.plant-7.example", home=home)
    named = ok("devices", "enroll", "pi-1", "--broker-host", "mqtt.plant-7.example",
               "--out", str(tmp_path / "pi-1"), home=home)
    assert "warning" not in named
    unnamed = ok("devices", "enroll", "pi-2", "--broker-host", "mqtt.elsewhere.example",
                 "--out", str(tmp_path / "pi-2"), home=home)
    said = " ".join(unnamed.split())          # rich wraps long lines
    assert "does not name 'mqtt.elsewhere.example'" in said
    assert "--hostname mqtt.elsewhere.example" in said


# --- a device's own key: edgefleet-agent keygen, then enroll --csr ------------------------------

def _keygen(device_id: str, out: Path) -> int:
    from agent.cli import main as agent_main
    return agent_main(["keygen", "--device-id", device_id, "--out", str(out)])


def test_a_device_made_key_is_certified_from_its_request_and_never_enters_the_bundle(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok("init", home=home)
    ok("broker-config", "--port", "18886", home=home)
    device = tmp_path / "device"
    assert _keygen("pi-own", device) == 0
    assert (device / "device.key").stat().st_mode & 0o777 == 0o600
    assert _keygen("pi-own", device) == 1                  # never replaces its key
    out = ok("devices", "enroll", "pi-own", "--csr", str(device / "device.csr"),
             "--out", str(tmp_path / "bundle"), home=home)
    assert "keeps its own device.key" in " ".join(out.split())
    bundle = tmp_path / "bundle"
    assert not (bundle / "device.key").exists()
    cert = x509.load_pem_x509_certificate((bundle / "device.crt").read_bytes())
    key = serialization.load_pem_private_key((device / "device.key").read_bytes(), None)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-own"


def test_a_request_for_another_name_a_forged_one_or_not_a_request_is_refused(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    ok("init", home=home)
    ok("broker-config", "--port", "18887", home=home)
    assert _keygen("pi-a", tmp_path / "a") == 0
    refused(invoke("devices", "enroll", "pi-b", "--csr", str(tmp_path / "a" / "device.csr"),
                   "--out", str(tmp_path / "b"), home=home), "names ['pi-a'], not 'pi-b'")
    pem = (tmp_path / "a" / "device.csr").read_bytes()
    request = x509.load_pem_x509_csr(pem)
    # The same request with its signature bytes changed: it no longer proves the key.
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    forged = tmp_path / "forged.csr"
    forged.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\n"
                       + base64.encodebytes(bytes(der))
                       + b"-----END CERTIFICATE REQUEST-----\n")
    refused(invoke("devices", "enroll", "pi-a", "--csr", str(forged), "--out",
                   str(tmp_path / "c"), home=home), "signature does not verify")
    refused(invoke("devices", "enroll", "pi-a", "--csr", str(home / "controller.toml"),
                   "--out", str(tmp_path / "d"), home=home), "not a PEM certificate request")
    refused(invoke("devices", "enroll", "pi-a", "--csr", str(tmp_path / "missing.csr"),
                   "--out", str(tmp_path / "e"), home=home), "missing.csr")
    assert not any((tmp_path / name).exists() for name in ("b", "c", "d", "e"))
