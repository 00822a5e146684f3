"""The fleet's certificate authority: it gives every device, controller and broker an identity.

A device's client certificate carries its id as the common name; the broker (configured by
`edgefleet broker-config`) takes that name as the MQTT username, so the topic ACL's ``%u``
confines each device to its own subtree. The CA keeps its own record of what it issued
(``issued.json``, like OpenSSL's index.txt) and builds the revocation list from it.

Keys are ECDSA P-256: every TLS stack on a Coral, Jetson or Raspberry Pi speaks it, and keys
are small. Private keys are written 0600 and never overwritten; the CA certificate and the
revocation list beside them stay readable, since the broker reads them.
"""

from __future__ import annotations

import datetime as dt
import enum
import fcntl
import ipaddress
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.files import replace_file, write_private

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL = "crl.pem"
INDEX = "issued.json"
# OpenSSL (and so Mosquitto) refuses every client once the list it holds has expired, and
# Mosquitto reads the file only at start and on SIGHUP: a year leaves room for both.
CRL_VALID_DAYS = 365
# A revocation list this close to its nextUpdate is rewritten (by `edgefleet serve`).
CRL_REFRESH_MARGIN_S = 30 * 86_400


DeviceKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey   # what a device's request may hold


class PKIError(RuntimeError):
    pass


class CertificateKind(enum.Enum):
    DEVICE = "device"
    CONTROLLER = "controller"
    OBSERVER = "observer"      # reads everything (monitoring, audits, tests), writes nothing
    BROKER = "broker"


class IssuedCertificate(msgspec.Struct, frozen=True, kw_only=True):
    serial: int
    common_name: str
    kind: CertificateKind
    not_before: float
    not_after: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class Credentials:
    key_pem: bytes
    cert_pem: bytes
    record: IssuedCertificate


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())






class FleetCA:
    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey,
                 cert: x509.Certificate) -> None:
        self.directory = directory
        self._key = key
        self.cert = cert

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, directory: Path, name: str = "edgefleet fleet CA",
               days: int = 3650) -> FleetCA:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / CA_KEY).exists():
            raise PKIError(f"{directory / CA_KEY} exists: refusing to replace the fleet's CA")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        write_private(directory / CA_KEY, _key_pem(key))
        replace_file(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(directory, key, cert)
        with ca._locked():
            replace_file(directory / INDEX, msgspec.json.encode([]))
            ca._write_crl([])
        return ca

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        try:
            key_pem = (directory / CA_KEY).read_bytes()
            cert_pem = (directory / CA_CERT).read_bytes()
        except FileNotFoundError as exc:
            raise PKIError(f"no fleet CA at {directory} ({exc.filename} missing): run "
                           "`edgefleet init` first") from None
        mode = (directory / CA_KEY).stat().st_mode & 0o777
        if mode & 0o077:
            raise PKIError(f"{directory / CA_KEY} is readable by others (mode {mode:o}); "
                           "chmod 600 it")
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{directory / CA_KEY}: not an EC private key")
        return cls(directory, key, x509.load_pem_x509_certificate(cert_pem))

    # --- issuing -----------------------------------------------------------------------------

    def issue(self, common_name: str, kind: CertificateKind, *, days: float = 825,
              valid_from: float | None = None, hostnames: Sequence[str] = (),
              public_key: DeviceKey | None = None) -> Credentials:
        """A fresh key and certificate. `valid_from` (default: now) lets tests make expired
        ones; `hostnames` become the subject alternative names of a broker certificate.

        A name belongs to one kind: the broker grants by name, so a device enrolled as
        "edgefleet-controller" would get the controller's rights."""
        self.check_name(common_name, kind)
        # With `public_key` (from a device's own request) no key is made here: key_pem is empty.
        key = ec.generate_private_key(ec.SECP256R1()) if public_key is None else None
        subject_key = key.public_key() if key is not None else public_key
        assert subject_key is not None
        start = _utc(valid_from) if valid_from is not None else (
            dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5))
        end = start + dt.timedelta(days=days)
        usage = (ExtendedKeyUsageOID.SERVER_AUTH if kind is CertificateKind.BROKER
                 else ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([
                       x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                       x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind.value)]))
                   .issuer_name(self.cert.subject)
                   .public_key(subject_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self._key.public_key()), critical=False))
        if hostnames:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(h) for h in hostnames]),
                critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        record = IssuedCertificate(serial=cert.serial_number, common_name=common_name,
                                   kind=kind, not_before=start.timestamp(),
                                   not_after=end.timestamp())
        with self._locked():
            replace_file(self.directory / INDEX, msgspec.json.encode([*self._records(), record]))
        return Credentials(_key_pem(key) if key is not None else b"",
                           cert.public_bytes(serialization.Encoding.PEM), record)

    def check_name(self, common_name: str, kind: CertificateKind) -> None:
        """Refuses a name that a live certificate of another kind holds."""
        clash = [r for r in self.records() if r.common_name == common_name
                 and r.kind is not kind and r.revoked_at is None]
        if clash and kind is not CertificateKind.BROKER:
            raise PKIError(f"{common_name!r} is already a {clash[0].kind.value}'s name; "
                           f"choose another name for this {kind.value}")

    def records(self) -> list[IssuedCertificate]:
        with self._locked():
            return self._records()

    def revoke(self, common_name: str, kind: CertificateKind, now: float) -> list[
            IssuedCertificate]:
        """Revokes every live certificate of that name and rewrites the CRL; returns them."""
        with self._locked():
            records, revoked = [], []
            for record in self._records():
                if (record.common_name == common_name and record.kind is kind
                        and record.revoked_at is None):
                    record = msgspec.structs.replace(record, revoked_at=now)
                    revoked.append(record)
                records.append(record)
            if revoked:
                replace_file(self.directory / INDEX, msgspec.json.encode(records))
                self._write_crl(records)
            return revoked

    # --- the revocation list -----------------------------------------------------------------

    def write_crl(self) -> Path:
        with self._locked():
            self._write_crl(self._records())
        return self.crl_path

    def crl_due(self, now: float) -> bool:
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return True
        next_update = crl.next_update_utc
        return next_update is None or next_update.timestamp() - now < CRL_REFRESH_MARGIN_S

    def _write_crl(self, records: Sequence[IssuedCertificate]) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=CRL_VALID_DAYS)))
        for record in records:
            if record.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(record.serial)
                    .revocation_date(_utc(record.revoked_at)).build())
        crl = builder.sign(self._key, hashes.SHA256())
        # World-readable: the broker reads it, and it holds only serial numbers.
        replace_file(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        os.chmod(self.crl_path, 0o644)

    def _records(self) -> list[IssuedCertificate]:
        try:
            return msgspec.json.decode((self.directory / INDEX).read_bytes(),
                                       type=list[IssuedCertificate])
        except FileNotFoundError:
            return []
        except msgspec.DecodeError as exc:
            raise PKIError(f"{self.directory / INDEX}: unreadable ({exc}); restore it from "
                           "a backup before issuing or revoking") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Two `edgefleet devices enroll` at once must not lose each other's index entry.
        with (self.directory / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def ensure_fleet_ca(home: Path, controller_name: str) -> FleetCA:
    """The home's CA, created with the controller's certificate if the home has none yet (a
    home made before the CA existed gets one the first time `broker-config` runs)."""
    directory = home / "pki"
    if (directory / CA_KEY).exists():
        return FleetCA.load(directory)
    ca = FleetCA.create(directory)
    controller = ca.issue(controller_name, CertificateKind.CONTROLLER, days=3650)
    for name in ("controller.crt", "controller.key"):
        (directory / name).unlink(missing_ok=True)
    (directory / "controller.crt").write_bytes(controller.cert_pem)
    write_private(directory / "controller.key", controller.key_pem)
    return ca


def certificate_names(pem: bytes) -> list[str]:
    """The DNS names and addresses a (broker) certificate is valid for."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def read_request(pem: bytes, common_name: str) -> DeviceKey:
    """The public key of a device's certificate request, once the request proves it holds the
    key and names the device it is enrolled as."""
    try:
        request = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise PKIError(f"not a PEM certificate request: {exc}") from None
    if not request.is_signature_valid:
        raise PKIError("the request's signature does not verify: it was not made with its key")
    names = [a.value for a in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [common_name]:
        raise PKIError(f"the request names {names or 'nobody'}, not {common_name!r}")
    key = request.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256:
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise PKIError(f"unsupported key in the request ({type(key).__name__}); use EC P-256 "
                   "(edgefleet-agent keygen) or RSA of 2048 bits or more")
