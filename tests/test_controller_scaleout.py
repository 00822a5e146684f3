"""Scale-out: two `edgefleet serve` processes on one PostgreSQL share the device streams through
an MQTT 5 shared subscription, and advisory locks let one of them at a time step each rollout.

Each process has a home folder of its own (same database, same signing key, its own MQTT client
id), as two machines would. What each controller was handed comes from the broker's own log.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from controller.db.engine import make_engine
from controller.settings import load_settings, write_settings
from edgefleet.contract import Channel, ContractError, TelemetryBatch, TopicSchema, decode
from tests.agent_harness import ROOT
from tests.broker import MosquittoBroker, connect_client
from tests.controlled_fleet import PROFILES, ControlledFleet
from tests.test_controller_e2e import QUICK, _deploys_per_device, _roll_out, _versions
from tests.variants_helpers import DATA, SOURCE

# Every test here runs on PostgreSQL only: advisory locks and concurrent writers are the point.
pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

SHARE_GROUP = "ingest"
CONTROLLERS = ("a", "b")
DEVICES = {f"{profile}-{index}": profile for index, profile in enumerate(PROFILES)}
# Mosquitto at log_type all: "Sending PUBLISH to <client> (d0, q1, r0, m4, '<topic>', ...".
SENT = re.compile(r"Sending PUBLISH to (\S+) \(d\d, q\d, r\d, m\d+, '([^']+)'")
RECEIVED = re.compile(r"Received PUBLISH from (\S+) \(d\d, q\d, r\d, m\d+, '([^']+)'")


def client_id(name: str) -> str:
    return f"edgefleet-controller-{name}"


@dataclass
class ScaledFleet(ControlledFleet):
    """A ControlledFleet with a PostgreSQL database and one serve process per home."""

    database_url: str = ""
    homes: dict[str, Path] = field(default_factory=dict)
    serves: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    schema: TopicSchema = field(default_factory=TopicSchema)

    def start_controller(self, name: str) -> None:
        log = (self.tmp / f"serve-{name}.log").open("ab")
        self.serves[name] = subprocess.Popen(
            [sys.executable, "-c", "from controller.cli import main; main()", "serve",
             "--home", str(self.homes[name])], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill_controller(self, name: str) -> None:
        process = self.serves[name]
        process.kill()
        process.wait(timeout=10)

    def db(self) -> Engine:
        return make_engine(self.database_url)

    def serve_log(self) -> str:
        return "\n".join(f"--- serve {name} ---\n" + path.read_text(errors="replace")[-1500:]
                         for name in CONTROLLERS
                         if (path := self.tmp / f"serve-{name}.log").exists())

    def delivered(self, channel: Channel, since: int = 0) -> Counter[str]:
        """How many messages of `channel` the broker sent to each client, from its log (from
        character `since` on)."""
        return Counter(client for client, topic in SENT.findall(self.broker.log_text()[since:])
                       if _channel(self.schema, topic) is channel)

    def published(self, channel: Channel, since: int = 0) -> Counter[str]:
        """How many messages of `channel` the broker received from each client."""
        return Counter(client for client, topic in
                       RECEIVED.findall(self.broker.log_text()[since:])
                       if _channel(self.schema, topic) is channel)


def _channel(schema: TopicSchema, topic: str) -> Channel | None:
    try:
        return schema.parse(topic).channel
    except ContractError:
        return None


@pytest.fixture
def scaled_fleet(tmp_path: Path, mosquitto: MosquittoBroker, database_url: str
                 ) -> Iterator[ScaledFleet]:
    """Two serve processes (client ids ...-a and ...-b, share group "ingest") on one fresh
    PostgreSQL database, and one agent of each profile, all registered."""
    root = f"so{tmp_path.name[-6:].replace('_', '')}/edgefleet"
    url = make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    homes = {name: tmp_path / f"home-{name}" for name in CONTROLLERS}
    fleet = ScaledFleet(home=homes["a"], broker=mosquitto, tmp=tmp_path, database_url=url,
                        homes=homes, schema=TopicSchema(root))
    fleet.cli("init", "--database-url", url, "--broker-port", str(mosquitto.port),
              "--topic-root", root)
    # The second home is a copy of the first (same key, settings, artifacts folder); only the
    # client id differs, because the broker allows one connection per client id.
    shutil.copytree(homes["a"], homes["b"])
    for name, home in homes.items():
        settings = load_settings(home)
        write_settings(home, msgspec.structs.replace(settings, broker=msgspec.structs.replace(
            settings.broker, client_id=client_id(name), share_group=SHARE_GROUP)))
    keys = tmp_path / "device-keys"
    keys.mkdir()
    shutil.copy(homes["a"] / "keys" / "signing-key.pub.pem", keys / "fleet.pem")
    for name in CONTROLLERS:
        fleet.start_controller(name)
    # Agents start once both controllers subscribed: telemetry sent before that reaches no one.
    fleet.wait(lambda: all(f"Sending SUBACK to {client_id(name)}" in mosquitto.log_text()
                           for name in CONTROLLERS), 30, "both controllers to subscribe")
    fleet.start_agents(DEVICES, keys=keys, topic_root=root)
    try:
        yield fleet
    finally:
        fleet.stop_processes()
        for process in fleet.serves.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=15)


def test_each_telemetry_window_is_stored_once_by_one_of_the_two_controllers(
        scaled_fleet: ScaledFleet) -> None:
    fleet = scaled_fleet
    payloads: list[bytes] = []
    watcher = connect_client(fleet.broker.port, on_message=lambda c, u, message:
                             payloads.append(bytes(message.payload)))
    try:
        watcher.subscribe_and_wait(fleet.schema.filter(Channel.TELEMETRY))
        time.sleep(6)                                  # about a dozen windows per agent
        for agent in fleet.agents.values():
            agent.stop()
        time.sleep(0.5)                                # the last PUBLISHes reach the watcher
    finally:
        watcher.close()
    seen: dict[str, list[int]] = {}
    for payload in payloads:
        window = decode(TelemetryBatch, payload)
        seen.setdefault(window.device_id, []).append(window.seq)
    assert set(seen) == set(DEVICES)
    assert all(len(seqs) >= 5 for seqs in seen.values()), seen

    def stored() -> dict[str, list[int]]:
        rows = fleet.query("SELECT device_id, seq FROM telemetry ORDER BY device_id, seq")
        by_device: dict[str, list[int]] = {}
        for row in rows:
            by_device.setdefault(row["device_id"], []).append(row["seq"])
        return by_device

    fleet.wait(lambda: all(set(seqs) <= set(stored().get(d, [])) for d, seqs in seen.items()),
               15, "every window the watcher saw in the database")
    table = stored()
    for device_id, seqs in seen.items():
        # What went over the wire while we watched is in the table, once, with no gap.
        watched = [s for s in table[device_id] if min(seqs) <= s <= max(seqs)]
        assert watched == sorted(set(seqs)) == list(range(min(seqs), max(seqs) + 1))
        assert len(table[device_id]) == len(set(table[device_id]))
    # The broker handed each window to exactly one controller, and both got a share.
    handed = fleet.delivered(Channel.TELEMETRY)
    controllers = {client_id(name): handed[client_id(name)] for name in CONTROLLERS}
    assert all(n > 0 for n in controllers.values()), controllers
    assert sum(controllers.values()) == sum(fleet.published(Channel.TELEMETRY).values())


def test_a_rollout_driven_by_two_controllers_deploys_each_device_once(
        scaled_fleet: ScaledFleet) -> None:
    fleet = scaled_fleet
    fleet.cli("models", "add", str(SOURCE), "--data", str(DATA), *QUICK)
    rollout_id = _roll_out(fleet, 1, "--groups", "25,50,100", "--soak", "1")
    fleet.wait(lambda: fleet.rollout_state(rollout_id) == "succeeded", 90, "the rollout")
    groups = fleet.query("SELECT state FROM rollout_groups WHERE rollout_id = :id",
                         id=rollout_id)
    assert [g["state"] for g in groups] == ["succeeded"] * 3
    assert _deploys_per_device(fleet, rollout_id) == dict.fromkeys(DEVICES, 1)
    attempts = fleet.query("SELECT attempts FROM deployments WHERE rollout_id = :id",
                           id=rollout_id)
    assert [a["attempts"] for a in attempts] == [1] * len(DEVICES)
    fleet.wait(lambda: set(_versions(fleet).values()) == {1}, 20, "fleet status on v1")
    # One deploy command went out per device, from whichever controller held the lock.
    assert fleet.delivered(Channel.COMMAND) == dict.fromkeys(DEVICES, 1)
    # Statuses and chunk requests were shared between the two controllers.
    for channel in (Channel.STATUS, Channel.CHUNK_REQUEST):
        handed = fleet.delivered(channel)
        assert all(handed[client_id(name)] > 0 for name in CONTROLLERS), (channel, handed)


def test_when_one_controller_is_killed_the_other_finishes_the_rollout(
        scaled_fleet: ScaledFleet) -> None:
    fleet = scaled_fleet
    fleet.cli("models", "add", str(SOURCE), "--data", str(DATA), *QUICK)
    rollout_id = _roll_out(fleet, 1, "--groups", "25,50,75,100", "--soak", "1.5")
    fleet.wait(lambda: len(_deploys_per_device(fleet, rollout_id)) >= 1, 60,
               "the first device to accept")
    # Kill the one that sent the canary its deploy command: it was driving the rollout.
    driver = next(iter(fleet.published(Channel.COMMAND)))
    dead, survivor = sorted(CONTROLLERS, key=lambda name: client_id(name) != driver)
    fleet.kill_controller(dead)
    gone = f"Client {client_id(dead)} closed its connection."
    fleet.wait(lambda: gone in fleet.broker.log_text(), 10, "the broker to notice")
    since = fleet.broker.log_text().index(gone)
    fleet.wait(lambda: fleet.rollout_state(rollout_id) == "succeeded", 60,
               "the rollout with one controller left")
    assert fleet.serves[survivor].poll() is None
    # From the kill on, the survivor got every status, chunk request and telemetry window:
    # none was queued for the dead controller's session.
    for channel in (Channel.STATUS, Channel.CHUNK_REQUEST, Channel.TELEMETRY):
        handed = fleet.delivered(channel, since)
        assert handed[client_id(survivor)] == sum(fleet.published(channel, since).values()) > 0, (
            channel, handed)
    assert _deploys_per_device(fleet, rollout_id) == dict.fromkeys(DEVICES, 1)
    attempts = fleet.query("SELECT attempts FROM deployments WHERE rollout_id = :id",
                           id=rollout_id)
    assert [a["attempts"] for a in attempts] == [1] * len(DEVICES)
