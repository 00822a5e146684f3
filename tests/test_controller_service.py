"""The controller process's own logic, without a broker: how its ingest loop copes with a
message that breaks a whole batch, and how it keeps the revocation list from expiring."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy import text

from controller.db.ingest import TelemetryWriter, WriteResult
from controller.mqtt import Received
from controller.pki import CA_KEY, CRL_REFRESH_MARGIN_S, FleetCA
from controller.service import Controller
from controller.settings import load_settings
from edgefleet.contract import Channel, TelemetryBatch, TopicSchema, encode
from tests.cli_helpers import ok


def _window(device_id: str, seq: int) -> bytes:
    return encode(TelemetryBatch(device_id=device_id, seq=seq, window_start=time.time() - 1,
                                 window_end=time.time(), model=None, inferences=seq))


def test_a_message_that_breaks_its_batch_is_dropped_alone_and_ingest_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    ok("init", home=home)
    controller = Controller(home, load_settings(home))
    original = TelemetryWriter.write

    def write(self: TelemetryWriter, items: list[tuple[str, bytes]]) -> WriteResult:
        # A stand-in for a bug no test has found yet: one payload that makes the writer raise.
        if any(device == "poison" for device, _ in items):
            raise RuntimeError("a bug in the writer")
        return original(self, items)

    monkeypatch.setattr(TelemetryWriter, "write", write)
    schema = TopicSchema("edgefleet")
    for device, seq in (("pi-1", 1), ("poison", 2), ("pi-2", 3)):
        controller.link.inbound.put(Received(schema.build(Channel.TELEMETRY, device),
                                             _window(device, seq)))
    stop = threading.Event()
    worker = threading.Thread(target=controller._ingest, args=(stop,), daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    rows: list[str] = []
    while time.monotonic() < deadline and len(rows) < 2:
        with controller.db.connect() as conn:
            rows = [r[0] for r in conn.execute(text("SELECT device_id FROM telemetry"))]
        time.sleep(0.1)
    stop.set()
    worker.join(timeout=10)
    assert sorted(rows) == ["pi-1", "pi-2"]
    assert controller.malformed == 1
    controller.db.dispose()


def test_serve_rewrites_a_revocation_list_that_nears_its_expiry(tmp_path: Path) -> None:
    """Mosquitto refuses every client once its revocation list expires: serve keeps it fresh."""
    home = tmp_path / "home"
    ok("init", home=home)
    ca = FleetCA.load(home / "pki")
    key = serialization.load_pem_private_key((home / "pki" / CA_KEY).read_bytes(), None)
    now = dt.datetime.now(dt.timezone.utc)
    stale = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
             .last_update(now - dt.timedelta(days=360)).next_update(now + dt.timedelta(days=2))
             .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    ca.crl_path.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    assert ca.crl_due(time.time())
    controller = Controller(home, load_settings(home))
    controller._keep_trust()
    fresh = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert fresh.next_update_utc is not None
    assert fresh.next_update_utc.timestamp() - time.time() > CRL_REFRESH_MARGIN_S
    controller.db.dispose()
