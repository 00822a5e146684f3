"""The controller process's own logic, without a broker: how its ingest loop copes with a
message that breaks a whole batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from controller.db.ingest import TelemetryWriter, WriteResult
from controller.mqtt import Received
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
