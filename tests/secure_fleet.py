"""A fleet on the broker configuration `edgefleet broker-config` writes: mutual TLS, per-device
ACL, revocation list. The controller home is made by the real CLI (init, broker-config with a
read-only "probe" observer), devices by `enroll_device` with test settings for the agent, and
Mosquitto runs the generated mosquitto.conf unchanged."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.enrollment import enroll_device
from controller.pki import FleetCA
from tests.agent_harness import FAKEROOTS, REPLAY, AgentProcess
from tests.broker import (
    HOST,
    LoopbackClient,
    MosquittoBroker,
    connect_client,
    find_mosquitto,
    free_ports,
)
from tests.controlled_fleet import ControlledFleet

PROBE = "probe"
TESTER = "tester"     # a second controller identity: writes commands while serve runs

TEST_AGENT: dict[str, dict[str, Any]] = {
    "broker": {"keepalive_s": 5, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
    "inference": {"source": "replay", "replay_file": str(REPLAY), "pace_s": 0.002},
    "telemetry": {"interval_s": 0.5, "heartbeat_interval_s": 1.0},
    "install": {"chunk_timeout_s": 2.0, "download_timeout_s": 60.0},
}


class GeneratedBroker(MosquittoBroker):
    """Mosquitto on a config file written elsewhere (here: by `edgefleet broker-config`)."""

    def __init__(self, conf: Path, port: int) -> None:
        binary = find_mosquitto()
        assert binary is not None, "mosquitto is not installed: run .ci/run"
        self.binary = binary
        self.directory = conf.parent
        self.host = HOST
        self.port = port
        self.listener_ports = []
        self.persistence_dir = self.directory / "data"
        self.config_path = conf
        self.log_path = self.directory / "mosquitto.log"
        self.config_text = conf.read_text()
        self._process: subprocess.Popen[bytes] | None = None
        # The port is in a config written by the CLI, which the settings and bundles name too.
        self._started = True

    def _answers(self, timeout: float) -> bool:
        # No plaintext CONNECT works here: a listening TLS socket is the sign of life.
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError:
            return False

    def reload(self) -> None:
        assert self._process is not None
        self._process.send_signal(1)   # SIGHUP


class SecureFleet(ControlledFleet):
    @property
    def ca(self) -> FleetCA:
        return FleetCA.load(self.home / "pki")

    @property
    def root(self) -> str:
        return str(self.json_settings()["broker"]["topic_root"])

    def json_settings(self) -> dict[str, Any]:
        import tomllib
        return tomllib.loads((self.home / "controller.toml").read_text())

    def enroll(self, device_id: str, *, fakeroot: str = "x86-64", days: float = 825,
               valid_from: float | None = None,
               agent: dict[str, dict[str, Any]] | None = None,
               request: bytes | None = None) -> Path:
        """A bundle for `device_id` with test settings (`agent` adds some); returns its
        agent.toml."""
        settings = self.json_settings()["broker"]
        sections = {name: {**TEST_AGENT.get(name, {}), **(agent or {}).get(name, {})}
                    for name in {*TEST_AGENT, *(agent or {})}}
        bundle = enroll_device(
            self.ca, self.home / "keys", device_id, self.tmp / "bundles" / device_id,
            days=days, valid_from=valid_from, state_dir=str(self.tmp / f"state-{device_id}"),
            broker={"host": settings["host"], "port": settings["port"],
                    "topic_root": settings["topic_root"]},
            agent={**sections, "hardware": {"root": str(FAKEROOTS / fakeroot)}},
            request=request)
        return bundle.config

    def start_agent(self, device_id: str, fakeroot: str = "x86-64") -> AgentProcess:
        config = self.tmp / "bundles" / device_id / "agent.toml"
        if not config.exists():
            self.enroll(device_id, fakeroot=fakeroot)
        agent = AgentProcess(config, self.tmp / f"{device_id}.log").start()
        self.agents[device_id] = agent
        return agent

    def tls_client(self, cert: Path, key: Path, *, client_id: str | None = None,
                   **kwargs: Any) -> LoopbackClient:
        ca = self.home / "pki" / "ca.crt"
        return connect_client(self.broker.port, client_id=client_id, before_connect=lambda c: (
            c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key),
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)), **kwargs)

    def probe(self, **kwargs: Any) -> LoopbackClient:
        """The privileged observer: reads everything under the fleet's root."""
        broker = self.home / "broker"
        return self.tls_client(broker / f"{PROBE}.crt", broker / f"{PROBE}.key",
                               client_id=PROBE, **kwargs)

    def as_tester(self, **kwargs: Any) -> LoopbackClient:
        """A controller identity of its own, so it does not displace `edgefleet serve`."""
        broker = self.home / "broker"
        return self.tls_client(broker / f"{TESTER}.crt", broker / f"{TESTER}.key",
                               client_id=TESTER, **kwargs)

    def as_controller(self, **kwargs: Any) -> LoopbackClient:
        pki = self.home / "pki"
        return self.tls_client(pki / "controller.crt", pki / "controller.key", **kwargs)

    def as_device(self, device_id: str, **kwargs: Any) -> LoopbackClient:
        bundle = self.tmp / "bundles" / device_id
        if not bundle.exists():
            self.enroll(device_id)
        return self.tls_client(bundle / "device.crt", bundle / "device.key",
                               client_id=kwargs.pop("client_id", device_id), **kwargs)


def make_secure_fleet(tmp_path: Path, *, database_url: str | None = None,
                      controllers: tuple[str, ...] = ()) -> SecureFleet:
    """The home (init, broker-config with a probe observer and the tester's controller
    identity, plus `controllers`) and the broker, not started."""
    port = free_ports(1)[0]
    root = f"sec{tmp_path.name[-6:].replace('_', '')}/edgefleet"
    home = tmp_path / "home"
    probe = ControlledFleet(home=home, broker=None, tmp=tmp_path)  # type: ignore[arg-type]
    probe.cli("init", "--topic-root", root,
              *(["--database-url", database_url] if database_url else []))
    user = ["--user", "root"] if os.geteuid() == 0 else []
    extra = [arg for name in controllers for arg in ("--controller", name)]
    probe.cli("broker-config", "--port", str(port), "--observer", PROBE, "--controller", TESTER,
              *extra, *user)
    broker = GeneratedBroker(home / "broker" / "mosquitto.conf", port)
    return SecureFleet(home=home, broker=broker, tmp=tmp_path)


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureFleet]:
    """The controller home and the broker from its generated config; no serve, no agents."""
    yield from _running(make_secure_fleet(tmp_path), serve=False)


@pytest.fixture
def secure_fleet(tmp_path: Path) -> Iterator[SecureFleet]:
    """The broker from the generated config and `edgefleet serve` on it; no agents yet."""
    yield from _running(make_secure_fleet(tmp_path), serve=True)


def _running(fleet: SecureFleet, *, serve: bool) -> Iterator[SecureFleet]:
    fleet.broker.start()
    if serve:
        fleet.start_serve()
    try:
        yield fleet
    finally:
        fleet.stop_processes()
        fleet.broker.stop()
        shutil.rmtree(fleet.home / "broker" / "data", ignore_errors=True)
