"""A whole local fleet for end-to-end tests: Mosquitto, `edgefleet serve` as a process (so it
can be killed), agents of several profiles, and the operator CLI run in-process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text

from controller.cli import main
from controller.db.engine import make_engine
from controller.settings import load_settings
from tests.agent_harness import ROOT, AgentProcess, agent_config
from tests.broker import MosquittoBroker

PROFILES = ("x86-64", "rpi4", "coral-usb-rpi4", "jetson-orin-nano")


@dataclass
class ControlledFleet:
    home: Path
    broker: MosquittoBroker
    tmp: Path
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    serve: subprocess.Popen[bytes] | None = None
    serve_starts: int = 0

    def cli(self, *args: str, ok: bool = True) -> str:
        result = CliRunner().invoke(main, [*args, "--home", str(self.home)],
                                    env={"COLUMNS": "220"})
        if ok and result.exit_code != 0:
            raise AssertionError(f"edgefleet {' '.join(args)} -> {result.exit_code}\n"
                                 f"{result.output}\n{result.exception!r}")
        return result.output

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def start_serve(self) -> None:
        self.serve_starts += 1
        log = (self.tmp / "serve.log").open("ab")
        self.serve = subprocess.Popen(
            [sys.executable, "-c", "from controller.cli import main; main()", "serve",
             "--home", str(self.home)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill_serve(self) -> None:
        assert self.serve is not None
        self.serve.send_signal(signal.SIGKILL)
        self.serve.wait(timeout=10)

    def start_agents(self, devices: dict[str, str], *, keys: Path, topic_root: str) -> None:
        """One agent process per device id (-> fake root), then waits until every one has
        registered with its profile."""
        for device_id, profile in devices.items():
            config = agent_config(self.tmp / f"{device_id}.toml", device_id=device_id,
                                  port=self.broker.port, topic_root=topic_root, keys_dir=keys,
                                  state_dir=self.tmp / f"state-{device_id}", fakeroot=profile)
            self.agents[device_id] = AgentProcess(config, self.tmp / f"{device_id}.log").start()
        self.wait(lambda: len(self.query("SELECT id FROM devices WHERE profile IS NOT NULL"))
                  == len(devices), 30, "every agent registered with its profile")

    def stop_processes(self) -> None:
        """Every agent, then serve: what a fixture does when its test ends."""
        for agent in self.agents.values():
            agent.stop()
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()
            self.serve.wait(timeout=15)

    def db(self) -> Engine:
        return make_engine(load_settings(self.home).database_url)

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        engine = self.db()
        try:
            with engine.connect() as conn:
                return [dict(r) for r in conn.execute(text(sql), params).mappings()]
        finally:
            engine.dispose()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                                     + self.serve_log()[-3000:])
            time.sleep(0.5)

    def rollout_state(self, rollout_id: str) -> str:
        rows = self.query("SELECT state FROM rollouts WHERE id = :id", id=rollout_id)
        return str(rows[0]["state"]) if rows else ""

    def serve_log(self) -> str:
        path = self.tmp / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def controlled_fleet(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[ControlledFleet]:
    root = f"e2e{tmp_path.name[-6:].replace('_', '')}/edgefleet"
    fleet = ControlledFleet(home=tmp_path / "home", broker=mosquitto, tmp=tmp_path)
    fleet.cli("init", "--broker-port", str(mosquitto.port), "--topic-root", root)
    keys = tmp_path / "device-keys"
    keys.mkdir()
    shutil.copy(fleet.home / "keys" / "signing-key.pub.pem", keys / "fleet.pem")
    fleet.start_serve()
    fleet.start_agents({f"{profile}-{index}": profile for index, profile in enumerate(PROFILES)},
                       keys=keys, topic_root=root)
    try:
        yield fleet
    finally:
        fleet.stop_processes()
