"""The broker SIGKILLed while telemetry flows, and the agent SIGKILLed during the outage: no
telemetry window is lost (the agent's outbox resends until a PUBACK; the controller
deduplicates by sequence number)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.contract import (
    Channel,
    CommandKind,
    ConfigCommand,
    TelemetryBatch,
    TopicSchema,
    decode,
    encode,
)
from tests.agent_harness import AgentProcess, agent_config, write_trust
from tests.agent_state import (
    counter,
    pending_telemetry,
    poll,
)
from tests.broker import MosquittoBroker, connect_client

# --- (c) the broker killed while telemetry flows ------------------------------------------------

@dataclass
class TelemetryCollector:
    """A controller's telemetry subscriber on a persistent session: every copy it gets."""

    seqs: list[int] = field(default_factory=list)
    windows: dict[int, set[float]] = field(default_factory=dict)   # seq -> window starts

    def __call__(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        batch = decode(TelemetryBatch, bytes(message.payload))
        self.windows.setdefault(batch.seq, set()).add(batch.window_start)
        self.seqs.append(batch.seq)

    def past(self, seq: int, n: int = 3) -> bool:
        return sum(s > seq for s in set(self.seqs)) >= n


@pytest.mark.slow
def test_no_telemetry_window_is_lost_when_the_broker_and_the_agent_are_killed(
        mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    # Persistence with a one-second autosave keeps both sessions (the subscriber's
    # subscription and what is queued for it) across a broker SIGKILL. Messages the broker had
    # in flight are lost on SIGKILL anyway: the agent's outbox must send them again until a
    # PUBACK comes. What no client can cover: a message the broker acknowledged and then lost
    # before delivering or saving it; so each kill below comes after the subscriber is back
    # and one autosave has passed since.
    broker = mosquitto_factory(persistence=True, autosave_interval=1).start()
    schema = TopicSchema(f"t{uuid.uuid4().hex[:10]}/edgefleet")
    device_id = f"crash-telemetry-{uuid.uuid4().hex[:6]}"
    collector = TelemetryCollector()
    subscriber = connect_client(
        broker.port, client_id=f"controller-{uuid.uuid4().hex[:6]}", clean_start=False,
        session_expiry=3600, on_message=collector,
        before_connect=lambda c: c.reconnect_delay_set(min_delay=1, max_delay=1))
    state = tmp_path / "state"
    config = agent_config(tmp_path / "agent.toml", device_id=device_id, port=broker.port,
                          topic_root=schema.root, keys_dir=write_trust(tmp_path / "keys"),
                          state_dir=state)
    config.write_text(config.read_text().replace("interval_s = 0.5", "interval_s = 0.1"))
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        subscriber.subscribe_and_wait(schema.build(Channel.TELEMETRY, device_id), qos=1)
        time.sleep(1.5)                            # an autosave with the subscription in it
        agent.start()
        first = None
        deadline = time.monotonic() + 20
        while first is None and time.monotonic() < deadline:
            if (state / "agent.db").exists():      # not before: connecting would create it
                with contextlib.suppress(sqlite3.Error):   # the schema may not be there yet
                    first = counter(state, "sequence:telemetry")
            time.sleep(0.01)
        assert first is not None, agent.log_text()
        poll(lambda: len(set(collector.seqs)) >= 10, 20, "telemetry")

        for outage_s in (0.5, 1.5, 3.0):           # the broker crashes while windows flow
            last = max(collector.seqs)
            broker.kill()
            time.sleep(outage_s)
            broker.start()
            poll(partial(collector.past, last), 30, "windows after the broker came back")
            time.sleep(1.5)                        # an autosave with the subscriber back

        # The agent crashes during an outage: what its outbox held must survive it, and the
        # windows of the restarted agent wait in the outbox until the broker is back.
        last = max(collector.seqs)
        broker.kill()
        time.sleep(1.0)
        agent.kill()
        stranded = pending_telemetry(state)
        agent.start()
        time.sleep(2.0)
        assert len(pending_telemetry(state)) > len(stranded) > 0, agent.log_text()[-3000:]
        broker.start()
        poll(lambda: collector.past(last, 20), 30, "the outbox after the outage")
        assert set(stranded) <= set(collector.seqs)

        # Stop telemetry, let the outbox drain, stop the agent cleanly.
        publisher = connect_client(broker.port)
        publisher.publish_and_wait(schema.command(device_id, CommandKind.CONFIG), encode(
            ConfigCommand(command_id="quiet", ts=time.time(), telemetry_interval_s=3600.0)))
        publisher.close()
        produced = counter(state, "sequence:telemetry")
        while True:                                # until a second passes with no new window
            time.sleep(1.0)
            now = counter(state, "sequence:telemetry")
            if now == produced:
                break
            produced = now
        assert produced is not None
        poll(lambda: not pending_telemetry(state), 30, "the outbox to drain")
        poll(lambda: produced in collector.seqs, 30, "the last window")
        assert agent.stop() == 0
        # Shutting down closes one last window; what the forwarder had no time to send stays
        # in the outbox for the next start (durable, so not lost).
        last_produced = counter(state, "sequence:telemetry")
        assert last_produced is not None and last_produced - produced <= 1
        time.sleep(0.5)
        left = pending_telemetry(state)
        assert counter(state, "dropped:telemetry") in (None, 0)
    finally:
        agent.stop()
        subscriber.close()
    received = set(collector.seqs)
    assert min(received) == first
    missing = set(range(first, last_produced + 1)) - received - set(left)
    assert not missing, f"windows lost: {sorted(missing)}"
    assert received <= set(range(first, last_produced + 1))
    # Copies of one number are copies of one window: a restarted agent never reuses a number.
    assert all(len(starts) == 1 for starts in collector.windows.values())
    duplicates = len(collector.seqs) - len(received)
    print(f"\ntelemetry: {len(received)} windows (seq {first}..{last_produced}), "
          f"{len(set(left))} left in the outbox at the clean stop, {duplicates} duplicate "
          f"copies received across 4 broker kills and 1 agent kill")
