"""The fleet CA (controller.pki) on a real temp folder: its files and their modes, what a
certificate of each kind says (name, kind, key usage, broker addresses, validity), names that
belong to one kind only, revocation into the CRL that Mosquitto reads, the index it keeps, and
issues from many threads that all land in that index."""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from controller.pki import (
    CA_CERT,
    CA_KEY,
    CRL,
    CRL_REFRESH_MARGIN_S,
    INDEX,
    CertificateKind,
    Credentials,
    FleetCA,
    PKIError,
)

DAY = 86_400.0


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.create(tmp_path / "pki")


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def cert_of(credentials: Credentials) -> x509.Certificate:
    return x509.load_pem_x509_certificate(credentials.cert_pem)


def crl_of(ca: FleetCA) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(ca.crl_path.read_bytes())


def attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    return str(name.get_attributes_for_oid(oid)[0].value)


# --- the CA's own files ----------------------------------------------------------------------

def test_create_writes_a_private_key_a_readable_certificate_an_empty_index_and_crl(
        ca: FleetCA) -> None:
    folder = ca.directory

    assert mode(folder / CA_KEY) == 0o600
    assert mode(folder / CA_CERT) & 0o044 == 0o044          # the broker reads it
    assert mode(folder / CRL) == 0o644
    assert ca.records() == []
    assert list(crl_of(ca)) == []
    cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert crl_of(ca).is_signature_valid(cert.public_key())  # type: ignore[arg-type]


def test_create_refuses_to_replace_an_existing_ca(ca: FleetCA) -> None:
    before = (ca.directory / CA_KEY).read_bytes(), (ca.directory / CA_CERT).read_bytes()

    with pytest.raises(PKIError, match="refusing to replace"):
        FleetCA.create(ca.directory)

    assert ((ca.directory / CA_KEY).read_bytes(), (ca.directory / CA_CERT).read_bytes()) == before


def test_load_gives_back_the_same_ca(ca: FleetCA) -> None:
    loaded = FleetCA.load(ca.directory)

    assert loaded.cert == ca.cert
    issued = cert_of(loaded.issue("pi-0001", CertificateKind.DEVICE))
    assert issued.issuer == ca.cert.subject
    issued.verify_directly_issued_by(ca.cert)


def test_load_refuses_a_key_others_can_read(ca: FleetCA) -> None:
    (ca.directory / CA_KEY).chmod(0o644)

    with pytest.raises(PKIError, match="readable by others"):
        FleetCA.load(ca.directory)


def test_load_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="edgefleet init"):
        FleetCA.load(tmp_path / "nothing-here")


# --- issuing ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "usage"), [
    (CertificateKind.DEVICE, ExtendedKeyUsageOID.CLIENT_AUTH),
    (CertificateKind.CONTROLLER, ExtendedKeyUsageOID.CLIENT_AUTH),
    (CertificateKind.OBSERVER, ExtendedKeyUsageOID.CLIENT_AUTH),
    (CertificateKind.BROKER, ExtendedKeyUsageOID.SERVER_AUTH),
])
def test_a_certificate_names_its_holder_and_kind_and_is_usable_for_its_side_only(
        ca: FleetCA, kind: CertificateKind, usage: x509.ObjectIdentifier) -> None:
    credentials = ca.issue("holder-1", kind)
    cert = cert_of(credentials)

    assert attribute(cert.subject, NameOID.COMMON_NAME) == "holder-1"
    assert attribute(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) == kind.value
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.cert)
    key = serialization.load_pem_private_key(credentials.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    record = credentials.record
    assert (record.serial, record.common_name, record.kind, record.revoked_at) == (
        cert.serial_number, "holder-1", kind, None)


def test_a_broker_certificate_carries_its_names_and_addresses(ca: FleetCA) -> None:
    cert = cert_of(ca.issue("mqtt.example.internal", CertificateKind.BROKER,
                            hostnames=["mqtt.example.internal", "localhost", "127.0.0.1", "::1"]))

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.internal", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                      ipaddress.ip_address("::1")]


def test_a_device_certificate_has_no_alternative_names(ca: FleetCA) -> None:
    cert = cert_of(ca.issue("pi-0001", CertificateKind.DEVICE))

    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)


def test_validity_runs_from_valid_from_for_the_given_days(ca: FleetCA) -> None:
    start = time.time() - 30 * DAY
    credentials = ca.issue("pi-0001", CertificateKind.DEVICE, days=10, valid_from=start)
    cert = cert_of(credentials)

    assert cert.not_valid_before_utc.timestamp() == pytest.approx(start, abs=1)
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(start + 10 * DAY, abs=1)
    assert credentials.record.not_before == pytest.approx(start, abs=1)
    assert credentials.record.not_after == pytest.approx(start + 10 * DAY, abs=1)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc)     # already expired


def test_by_default_a_certificate_is_valid_now_for_825_days(ca: FleetCA) -> None:
    cert = cert_of(ca.issue("pi-0001", CertificateKind.DEVICE))
    now = time.time()

    assert cert.not_valid_before_utc.timestamp() <= now
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(
        cert.not_valid_before_utc.timestamp() + 825 * DAY, abs=1)


def test_every_certificate_gets_its_own_serial_and_index_entry(ca: FleetCA) -> None:
    issued = [ca.issue(f"pi-{i:04d}", CertificateKind.DEVICE) for i in range(5)]
    issued.append(ca.issue("pi-0000", CertificateKind.DEVICE))          # re-issue, same kind

    assert ca.records() == [c.record for c in issued]
    assert len({c.record.serial for c in issued}) == 6


@pytest.mark.parametrize(("first", "second"), [
    (CertificateKind.CONTROLLER, CertificateKind.DEVICE),
    (CertificateKind.DEVICE, CertificateKind.CONTROLLER),
    (CertificateKind.DEVICE, CertificateKind.OBSERVER),
    (CertificateKind.OBSERVER, CertificateKind.DEVICE),
])
def test_a_name_belongs_to_one_kind(ca: FleetCA, first: CertificateKind,
                                    second: CertificateKind) -> None:
    ca.issue("edgefleet-controller", first)
    before = ca.records()

    with pytest.raises(PKIError, match=f"already a {first.value}'s name"):
        ca.issue("edgefleet-controller", second)

    assert ca.records() == before


def test_a_revoked_name_may_be_given_to_another_kind(ca: FleetCA) -> None:
    ca.issue("pi-0001", CertificateKind.DEVICE)
    ca.revoke("pi-0001", CertificateKind.DEVICE, time.time())

    ca.issue("pi-0001", CertificateKind.OBSERVER)

    assert [r.kind for r in ca.records()] == [CertificateKind.DEVICE, CertificateKind.OBSERVER]


# --- revocation ------------------------------------------------------------------------------

def test_revoke_puts_every_live_serial_of_the_name_in_the_crl(ca: FleetCA) -> None:
    first = ca.issue("pi-0001", CertificateKind.DEVICE).record
    second = ca.issue("pi-0001", CertificateKind.DEVICE).record
    other = ca.issue("pi-0002", CertificateKind.DEVICE).record
    now = time.time()

    revoked = ca.revoke("pi-0001", CertificateKind.DEVICE, now)

    assert {r.serial for r in revoked} == {first.serial, second.serial}
    assert all(r.revoked_at == now for r in revoked)
    crl = crl_of(ca)
    assert {entry.serial_number for entry in crl} == {first.serial, second.serial}
    assert crl.get_revoked_certificate_by_serial_number(other.serial) is None
    entry = crl.get_revoked_certificate_by_serial_number(first.serial)
    assert entry is not None
    assert entry.revocation_date_utc.timestamp() == pytest.approx(now, abs=1)
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.cert.subject
    assert mode(ca.crl_path) == 0o644
    by_serial = {r.serial: r.revoked_at for r in FleetCA.load(ca.directory).records()}
    assert by_serial == {first.serial: now, second.serial: now, other.serial: None}


def test_revoking_twice_is_a_no_op(ca: FleetCA) -> None:
    ca.issue("pi-0001", CertificateKind.DEVICE)
    ca.revoke("pi-0001", CertificateKind.DEVICE, time.time())
    index, crl = (ca.directory / INDEX).read_bytes(), ca.crl_path.read_bytes()

    assert ca.revoke("pi-0001", CertificateKind.DEVICE, time.time() + 60) == []

    assert ((ca.directory / INDEX).read_bytes(), ca.crl_path.read_bytes()) == (index, crl)


def test_revoke_touches_only_the_named_kind(ca: FleetCA) -> None:
    ca.issue("edgefleet-controller", CertificateKind.CONTROLLER)

    assert ca.revoke("edgefleet-controller", CertificateKind.DEVICE, time.time()) == []
    assert list(crl_of(ca)) == []


def test_a_fresh_crl_is_not_due_and_is_valid_for_weeks(ca: FleetCA) -> None:
    now = time.time()
    crl = crl_of(ca)

    assert not ca.crl_due(now)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc.timestamp() - now > CRL_REFRESH_MARGIN_S
    assert ca.crl_due(crl.next_update_utc.timestamp() - CRL_REFRESH_MARGIN_S + 60)


def _write_crl_by_hand(ca: FleetCA, next_update_in_s: float) -> None:
    key = serialization.load_pem_private_key((ca.directory / CA_KEY).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(now - dt.timedelta(days=29))
           .next_update(now + dt.timedelta(seconds=next_update_in_s))
           .sign(key, hashes.SHA256()))
    ca.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_a_crl_near_its_next_update_is_due_and_write_crl_renews_it(ca: FleetCA) -> None:
    _write_crl_by_hand(ca, DAY)
    assert ca.crl_due(time.time())

    ca.write_crl()

    assert not ca.crl_due(time.time())


@pytest.mark.parametrize("content", [None, b"", b"-----BEGIN X509 CRL-----\ngarbage\n"],
                         ids=["missing", "empty", "garbage"])
def test_a_missing_or_unreadable_crl_is_due(ca: FleetCA, content: bytes | None) -> None:
    if content is None:
        ca.crl_path.unlink()
    else:
        ca.crl_path.write_bytes(content)

    assert ca.crl_due(time.time())


def test_write_crl_keeps_the_revoked_serials(ca: FleetCA) -> None:
    serial = ca.issue("pi-0001", CertificateKind.DEVICE).record.serial
    ca.revoke("pi-0001", CertificateKind.DEVICE, time.time())
    _write_crl_by_hand(ca, DAY)                           # an old list without it

    ca.write_crl()

    assert [entry.serial_number for entry in crl_of(ca)] == [serial]


# --- the index -------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{not json", b'{"serial": 1}', b'[{"serial": "x"}]'],
                         ids=["not-json", "not-a-list", "wrong-field-type"])
def test_a_corrupt_index_is_refused_before_issuing_or_revoking(ca: FleetCA,
                                                               content: bytes) -> None:
    (ca.directory / INDEX).write_bytes(content)
    crl = ca.crl_path.read_bytes()

    with pytest.raises(PKIError, match=INDEX):
        ca.issue("pi-0001", CertificateKind.DEVICE)
    with pytest.raises(PKIError, match="backup"):
        ca.revoke("pi-0001", CertificateKind.DEVICE, time.time())
    with pytest.raises(PKIError):
        ca.records()

    assert (ca.directory / INDEX).read_bytes() == content
    assert ca.crl_path.read_bytes() == crl


def test_issues_from_many_threads_all_land_in_the_index(ca: FleetCA) -> None:
    serials: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def enroll(worker: int) -> None:
        # Each thread its own FleetCA, as two `edgefleet devices enroll` processes would have.
        mine = FleetCA.load(ca.directory)
        start.wait()
        try:
            for i in range(4):
                record = mine.issue(f"pi-{worker}-{i}", CertificateKind.DEVICE).record
                with lock:
                    serials.append(record.serial)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    records = ca.records()
    assert sorted(r.serial for r in records) == sorted(serials)
    assert len(records) == 32
    assert {r.common_name for r in records} == {f"pi-{w}-{i}" for w in range(8) for i in range(4)}
