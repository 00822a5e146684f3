"""The README's main job, end to end: `edgefleet demo` with three devices and short windows,
then the database it leaves behind."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.agent_harness import ROOT


def test_the_demo_runs_end_to_end_and_leaves_the_fleet_on_v2(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-c", "from controller.cli import main; main()", "demo",
         "--devices", "3", "--fast", "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={
            "COLUMNS": "120", "PATH": "/usr/sbin:/usr/bin:/bin:/usr/local/bin"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "demo finished" in done.stdout
    assert "stopped by its gate" in done.stdout
    db = sqlite3.connect(workdir / "controller" / "fleet.db")
    rollouts = dict(db.execute("SELECT name, state FROM rollouts").fetchall())
    assert rollouts["v1 install"] == "succeeded"
    assert rollouts["v2 staged"] == "succeeded"
    assert rollouts["v3 worse"] in ("failed", "paused")
    versions = {row[0] for row in db.execute("SELECT model_version FROM fleet_status")}
    assert versions == {2}
    # The fleet ran on the secure broker config, enrolled devices, and a rotated key.
    conf = (workdir / "controller" / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "allow_anonymous false" in conf
    assert sum(line.startswith("listener ") for line in conf.splitlines()) == 1
    enrolled = {row[0] for row in db.execute(
        "SELECT subject FROM audit_log WHERE action = 'device.enroll'")}
    assert enrolled == {row[0] for row in db.execute("SELECT id FROM devices")}
    assert len(enrolled) == 3
    for device in enrolled:
        trusted = workdir / "devices" / device / "state" / "trusted-keys.json"
        assert b'"version":2' in trusted.read_bytes(), device
    groups = db.execute("SELECT COUNT(*) FROM rollout_groups WHERE rollout_id = "
                        "(SELECT id FROM rollouts WHERE name = 'v2 staged')").fetchone()[0]
    assert groups >= 2
    # every process the demo started is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(workdir) not in ps
