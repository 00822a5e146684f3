"""A fleet of one real agent process, a real Mosquitto and the controller's side (FleetPeer),
shared by the agent's end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from agent.slots import Pointers
from controller.variants.builders import onnx_int8
from controller.variants.source import load_data, load_source
from edgefleet.contract import TopicSchema
from edgefleet.contract.signing import generate_private_key
from tests.agent_harness import AgentProcess, agent_config, write_trust
from tests.broker import MosquittoBroker
from tests.fleet_peer import FleetPeer
from tests.variants_helpers import DATA, SOURCE

DEVICE = "x86-test-01"


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8")
    source = load_source(SOURCE)
    return onnx_int8.build(source, load_data(DATA, source), out).path


@dataclass
class Fleet:
    broker: MosquittoBroker
    peer: FleetPeer
    agent: AgentProcess
    state: Path

    def pointers(self) -> Pointers:
        return msgspec.json.decode((self.state / "models" / "pointers.json").read_bytes(),
                                   type=Pointers)

    def serving(self, version: int, timeout: float = 20.0) -> None:
        """Waits for telemetry showing `version` running with inferences."""
        def ok() -> bool:
            recent = self.peer.telemetry(DEVICE)[-2:]
            return any(b.model is not None and b.model.model_version == version
                       and b.inferences > 0 for b in recent)
        self.peer.wait(ok, timeout, f"telemetry from version {version}")


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: MosquittoBroker,
          topic_schema: TopicSchema) -> Iterator[Fleet]:
    key = generate_private_key()
    keys = write_trust(tmp_path / "keys", key)
    state = tmp_path / "state"
    config = agent_config(tmp_path / "agent.toml", device_id=DEVICE, port=mosquitto.port,
                          topic_root=topic_schema.root, keys_dir=keys, state_dir=state)
    peer = FleetPeer(mosquitto.port, topic_schema, key)
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    # Commands queue in the device's persistent session, which exists from its first connect.
    peer.wait(lambda: bool(peer.devices[DEVICE].presence), 20, "the agent's presence")
    try:
        yield Fleet(mosquitto, peer, agent, state)
    finally:
        agent.stop()
        peer.close()
        print(agent.log_text()[-4000:])


def deploy_v1(fleet: Fleet) -> None:
    command = fleet.peer.deploy(DEVICE, fleet.peer.manifest(DEVICE, SOURCE, version=1),
                                watch_s=1.0)
    status = fleet.peer.final_status(DEVICE, command)
    assert status.state.value == "succeeded", status.reason
    fleet.serving(1)
