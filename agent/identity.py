"""`edgefleet-agent keygen`: the device makes its own TLS key, so the key never leaves it.

Writes the key (0600, never replaced) and a certificate signing request naming the device; the
operator takes the request to the controller (`edgefleet devices enroll ID --csr FILE`) and
brings back a bundle without a key. For devices where the key should be born on the device
(and later, in a TPM or secure element).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.durable import fsync_directory
from edgefleet.contract import validate_device_id

KEY_FILE = "device.key"
CSR_FILE = "device.csr"


def make_key_and_request(device_id: str, directory: Path) -> tuple[Path, Path]:
    validate_device_id(device_id)
    directory.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = directory / KEY_FILE, directory / CSR_FILE
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never replaced
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
        f.flush()
        os.fsync(f.fileno())
    csr_path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    fsync_directory(directory)
    return key_path, csr_path
