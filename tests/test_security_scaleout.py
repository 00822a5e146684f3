"""Two `edgefleet serve` processes on the secure broker, each with its own controller
identity (`broker-config --controller serve-2`), sharing the streams on one PostgreSQL.

On this broker the certificate's name is the client id, so two processes sharing one
certificate would keep disconnecting each other; with one identity each they both stay
connected, each telemetry window is stored once, and a rollout still reaches the device.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from sqlalchemy.engine import make_url

from controller.settings import load_settings, write_settings
from tests.agent_harness import ROOT
from tests.secure_fleet import SecureFleet, make_secure_fleet
from tests.variants_helpers import DATA, SOURCE

pytestmark = [pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
              pytest.mark.timeout(240)]
SECOND = "serve-2"
DEVICE = "x86-64-scaled"


@pytest.fixture
def two_serves(tmp_path: Path, database_url: str) -> Iterator[SecureFleet]:
    url = make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    fleet = make_secure_fleet(tmp_path, database_url=url, controllers=(SECOND,))
    second = tmp_path / "home-2"
    shutil.copytree(fleet.home, second, ignore=shutil.ignore_patterns("broker"))
    for home, cert in ((fleet.home, None), (second, fleet.home / "broker" / SECOND)):
        settings = load_settings(home)
        broker = msgspec.structs.replace(settings.broker, share_group="ingest")
        if cert is not None:
            broker = msgspec.structs.replace(broker, cert_file=f"{cert}.crt",
                                             key_file=f"{cert}.key")
        write_settings(home, msgspec.structs.replace(settings, broker=broker))
    fleet.broker.start()
    fleet.start_serve()
    log = (tmp_path / "serve-2.log").open("ab")
    other = subprocess.Popen([sys.executable, "-c", "from controller.cli import main; main()",
                              "serve", "--home", str(second)], cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT)
    log.close()
    try:
        fleet.wait(lambda: all(f"as {name} " in fleet.broker.log_text()
                               for name in ("edgefleet-controller", SECOND)), 30,
                   "both controllers connected")
        fleet.start_agent(DEVICE)
        fleet.wait(lambda: bool(fleet.query("SELECT 1 FROM devices WHERE id = :d AND profile "
                                            "IS NOT NULL", d=DEVICE)), 30, "the device")
        yield fleet
    finally:
        fleet.stop_processes()
        if other.poll() is None:
            other.terminate()
            other.wait(timeout=15)
        fleet.broker.stop()


def test_two_controllers_with_their_own_identities_stay_connected_and_share_the_work(
        two_serves: SecureFleet) -> None:
    fleet = two_serves
    fleet.cli("models", "add", str(SOURCE), "--data", str(DATA), "--only", "onnx-fp32")
    out = fleet.cli("rollouts", "create", "--name", "scaled", "--model", "digits",
                    "--version", "1", "--groups", "100", "--watch", "1")
    rollout_id = out.split()[1]
    fleet.cli("rollouts", "start", rollout_id)
    fleet.wait(lambda: fleet.rollout_state(rollout_id) == "succeeded", 90, "the rollout")
    time.sleep(3.0)
    log = fleet.broker.log_text()
    # Neither took the other's session: no "already connected" for a controller.
    assert "Client edgefleet-controller already connected" not in log
    assert f"Client {SECOND} already connected" not in log
    rows = fleet.query("SELECT COUNT(*) AS n, COUNT(DISTINCT seq) AS d FROM telemetry "
                       "WHERE device_id = :d", d=DEVICE)
    assert rows[0]["n"] == rows[0]["d"] > 0
    assert "Traceback" not in (fleet.tmp / "serve-2.log").read_text()
