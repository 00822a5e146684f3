"""Ingest stores what devices send, on SQLite and on a real PostgreSQL: telemetry once per
(device, seq), malformed messages reported with device and reason and never in the way of the
good ones, unknown devices registered as unknown hardware, presence, facts and statuses
upserted; and the fleet views read the result."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text

from controller.db import DatabaseUnavailable, make_engine
from controller.db import ingest as ingest_module
from controller.db.ingest import (
    FactsWriter,
    HeartbeatWriter,
    PresenceWriter,
    Rejected,
    StatusWriter,
    TelemetryWriter,
    WriteResult,
)
from controller.db.schema import Device
from edgefleet.contract import (
    ActiveModel,
    CommandState,
    CommandStatus,
    DeviceFacts,
    HardwareFacts,
    Heartbeat,
    InstallStage,
    LatencyStats,
    Presence,
    PresenceState,
    TelemetryBatch,
    VariantKind,
    encode,
)

T0 = 1_795_000_000.0
SEQ0 = 1_795_000_000_000  # agents start seq at the clock in milliseconds: past 32 bits
V2 = ActiveModel(model_name="digits", model_version=2, variant_kind=VariantKind.TFLITE_INT8,
                 artifact_id="digits-v2-tflite-int8-1f3a")
V3 = ActiveModel(model_name="digits", model_version=3, variant_kind=VariantKind.ONNX_INT8,
                 artifact_id="digits-v3-onnx-int8-77aa")


class Clock:
    def __init__(self, now: float = T0 + 1_000) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def window(device: str, seq: int, *, end: float | None = None, model: ActiveModel | None = V2,
           p95: float = 3.75, accuracy: float | None = 0.96,
           execution: str = "litert/edgetpu") -> TelemetryBatch:
    end = T0 + 10 * (seq - SEQ0 + 1) if end is None else end
    return TelemetryBatch(
        device_id=device, seq=seq, window_start=end - 10, window_end=end, model=model,
        execution=execution, inferences=1_000, errors=2, throughput_ips=100.0,
        latency=LatencyStats(p50_ms=2.5, p95_ms=p95, p99_ms=4.5, max_ms=9.0), labelled=900,
        accuracy=accuracy, agreement=0.99, cpu_percent=12.5, rss_mb=61.25, temperature_c=48.3,
        dropped_windows=0)


def incoming(*messages: TelemetryBatch | Presence | DeviceFacts | CommandStatus | Heartbeat
             ) -> list[tuple[str, bytes]]:
    return [(m.device_id, encode(m)) for m in messages]


def rows(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(text(sql), params)]


def device(engine: Engine, device_id: str) -> dict[str, Any]:
    """The devices row, typed (booleans, JSON) by the model on both backends."""
    with engine.connect() as connection:
        [found] = connection.execute(select(Device.__table__).where(Device.id == device_id))
    return dict(found._mapping)


def patched_json(payload: bytes, **changes: Any) -> bytes:
    obj = msgspec.json.decode(payload)
    obj.update(changes)
    return msgspec.json.encode(obj)


# --- telemetry ---------------------------------------------------------------------------------

def test_a_batch_of_good_telemetry_is_stored_whole(migrated_engine: Engine) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    batch = [window(f"pi-{d}", SEQ0 + s) for d in range(3) for s in range(4)]

    result = writer.write(incoming(*batch))

    assert result == WriteResult(stored=12, duplicates=0, malformed=[])
    [stored] = rows(migrated_engine, "SELECT * FROM telemetry WHERE device_id = 'pi-1' "
                                     "AND seq = :seq", seq=SEQ0 + 2)
    del stored["id"]
    assert stored == {
        "device_id": "pi-1", "seq": SEQ0 + 2, "window_start": T0 + 20, "window_end": T0 + 30,
        "model_name": "digits", "model_version": 2, "variant_kind": "tflite-int8",
        "artifact_id": "digits-v2-tflite-int8-1f3a", "execution": "litert/edgetpu",
        "inferences": 1_000, "errors": 2, "throughput_ips": 100.0, "p50_ms": 2.5,
        "p95_ms": 3.75, "p99_ms": 4.5, "max_ms": 9.0, "labelled": 900, "accuracy": 0.96,
        "agreement": 0.99, "cpu_percent": 12.5, "rss_mb": 61.25, "temperature_c": 48.3,
        "dropped_windows": 0, "received_at": T0 + 1_000}


def test_a_window_without_model_or_latency_stores_nulls(migrated_engine: Engine) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    empty = TelemetryBatch(device_id="pi-0", seq=SEQ0, window_start=T0, window_end=T0 + 10,
                           model=None)

    assert writer.write(incoming(empty)).stored == 1
    [stored] = rows(migrated_engine, "SELECT model_name, p95_ms, accuracy FROM telemetry")
    assert stored == {"model_name": None, "p95_ms": None, "accuracy": None}


def test_the_same_batch_again_stores_nothing_and_counts_duplicates(
        migrated_engine: Engine) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    batch = incoming(*[window("pi-0", SEQ0 + s) for s in range(5)])
    writer.write(batch)

    again = writer.write(batch)

    assert again == WriteResult(stored=0, duplicates=5, malformed=[])
    assert rows(migrated_engine, "SELECT COUNT(*) AS n FROM telemetry") == [{"n": 5}]
    assert (writer.totals.stored, writer.totals.duplicates) == (5, 5)


def test_a_redelivery_inside_one_batch_is_stored_once(migrated_engine: Engine) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    first, second = window("pi-0", SEQ0), window("pi-0", SEQ0 + 1)

    result = writer.write(incoming(first, second, first))

    assert (result.stored, result.duplicates) == (2, 1)


def test_the_same_seq_from_two_devices_is_two_windows(migrated_engine: Engine) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())

    result = writer.write(incoming(window("pi-0", SEQ0), window("pi-1", SEQ0)))

    assert (result.stored, result.duplicates) == (2, 0)


def test_malformed_telemetry_is_reported_and_the_good_is_stored(
        migrated_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    good = encode(window("pi-0", SEQ0))
    batch = [
        ("pi-0", good),
        ("pi-1", b"\x00\xffnot json at all"),
        ("pi-2", patched_json(encode(window("pi-2", SEQ0)), seq="forty-two")),
        ("pi-3", encode(window("pi-9", SEQ0))),                     # another device's id
        ("pi-4", patched_json(encode(window("pi-4", SEQ0)), seq=2**64 - 1)),
        ("pi-5", encode(window("pi-5", SEQ0, execution="cpu\x00"))),
        ("pi-6", msgspec.msgpack.encode(window("pi-6", SEQ0, p95=float("nan")))),
        ("pi-0", encode(window("pi-0", SEQ0 + 1))),
    ]

    with caplog.at_level(logging.WARNING, logger="controller.db.ingest"):
        result = writer.write(batch)

    assert (result.stored, result.duplicates) == (2, 0)
    reasons = dict(result.malformed)
    assert list(reasons) == ["pi-1", "pi-2", "pi-3", "pi-4", "pi-5", "pi-6"]
    assert "malformed payload" in reasons["pi-1"]
    assert reasons["pi-2"] == "TelemetryBatch: at $.seq: expected int, got str"
    assert reasons["pi-3"] == "payload says device_id 'pi-9', the topic says 'pi-3'"
    assert reasons["pi-4"] == f"seq: {2**64 - 1} does not fit in a 64-bit integer"
    assert reasons["pi-5"] == "execution: contains a NUL character"
    # NaN can only come in MessagePack (JSON has none), which telemetry no longer accepts.
    assert reasons["pi-6"] == "TelemetryBatch: at $: expected a JSON object, got a MessagePack map"
    logged = [r.getMessage() for r in caplog.records]
    assert all(any(device in line for line in logged) for device in reasons)
    assert writer.totals.malformed == 6
    assert [r["device_id"] for r in rows(migrated_engine, "SELECT id AS device_id FROM "
                                         "devices ORDER BY id")] == ["pi-0"]


def test_a_row_the_database_refuses_is_isolated_from_the_batch(
        migrated_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Should a value slip past the checks, the database's refusal still costs only that row.
    monkeypatch.setattr(ingest_module, "_suspicious", lambda row: False)
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    batch = [("pi-0", encode(window("pi-0", SEQ0))),
             ("pi-1", patched_json(encode(window("pi-1", SEQ0)), seq=2**64 - 1)),
             ("pi-2", encode(window("pi-2", SEQ0)))]

    result = writer.write(batch)

    assert result.stored == 2
    [(device_id, reason)] = result.malformed
    assert device_id == "pi-1"
    assert reason.startswith("the database refused it: ")


fresh_seq = itertools.count(SEQ0 + 10_000)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(max_size=64) | st.text(max_size=64).map(str.encode),
                        min_size=1, max_size=5))
def test_no_garbage_raises_or_blocks_a_good_window(migrated_engine: Engine,
                                                   garbage: list[bytes]) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    seq = next(fresh_seq)
    batch = [("pi-g", payload) for payload in garbage] + [("pi-0", encode(window("pi-0", seq)))]

    result = writer.write(batch)

    assert result.stored == 1
    assert len(result.malformed) == len(garbage)


def test_telemetry_from_an_unknown_device_registers_it_as_unknown_hardware(
        migrated_engine: Engine) -> None:
    TelemetryWriter(migrated_engine, clock=Clock(T0 + 500)).write(
        incoming(window("stranger", SEQ0)))

    found = device(migrated_engine, "stranger")
    assert (found["hardware_known"], found["profile"], found["online"]) == (False, None, True)
    assert (found["first_seen"], found["last_seen"]) == (T0 + 500, T0 + 500)
    assert (found["labels"], found["facts"]) == ({}, {})


def test_telemetry_tracks_the_active_model_and_a_replayed_window_does_not_move_it_back(
        migrated_engine: Engine) -> None:
    clock = Clock()
    writer = TelemetryWriter(migrated_engine, clock=clock)
    writer.write(incoming(window("pi-0", SEQ0, model=V2), window("pi-0", SEQ0 + 1, model=V3,
                                                                 execution="onnxruntime/CPU")))
    clock.now += 60
    writer.write(incoming(window("pi-0", SEQ0 - 5, end=T0 - 100, model=V2)))  # from the outbox

    found = device(migrated_engine, "pi-0")
    assert (found["active_model_version"], found["active_variant_kind"],
            found["active_artifact_id"], found["active_execution"]) == (
        3, "onnx-int8", "digits-v3-onnx-int8-77aa", "onnxruntime/CPU")
    assert found["last_seen"] == clock.now


def test_telemetry_rewrites_a_device_row_only_when_something_changed(
        migrated_engine: Engine) -> None:
    clock = Clock()
    writer = TelemetryWriter(migrated_engine, clock=clock, touch_interval_s=30)
    writer.write(incoming(window("pi-0", SEQ0)))
    first_seen_at = clock.now

    clock.now += 10
    writer.write(incoming(window("pi-0", SEQ0 + 1)))
    unchanged = device(migrated_engine, "pi-0")
    clock.now += 1
    writer.write(incoming(window("pi-0", SEQ0 + 2, model=V3)))
    new_model = device(migrated_engine, "pi-0")
    clock.now += 30
    writer.write(incoming(window("pi-0", SEQ0 + 3, model=V3)))
    late = device(migrated_engine, "pi-0")

    assert unchanged["last_seen"] == first_seen_at
    assert (new_model["last_seen"], new_model["active_model_version"]) == (first_seen_at + 11, 3)
    assert late["last_seen"] == clock.now


def test_a_device_deleted_behind_the_writers_back_is_registered_again(
        migrated_engine: Engine) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    writer.write(incoming(window("pi-0", SEQ0)))
    with migrated_engine.begin() as connection:
        connection.execute(text("DELETE FROM telemetry"))
        connection.execute(text("DELETE FROM devices"))

    result = writer.write(incoming(window("pi-0", SEQ0 + 1)))

    assert (result.stored, result.malformed) == (1, [])
    assert device(migrated_engine, "pi-0")["hardware_known"] is False


def test_a_database_that_is_gone_raises_database_unavailable(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}", check=False)
    with pytest.raises(DatabaseUnavailable):
        TelemetryWriter(engine).write(incoming(window("pi-0", SEQ0)))


# --- presence, facts, heartbeats, statuses -----------------------------------------------------

def test_presence_marks_devices_online_and_offline(migrated_engine: Engine) -> None:
    clock = Clock()
    writer = PresenceWriter(migrated_engine, clock=clock)

    writer.write(incoming(Presence(device_id="pi-0", state=PresenceState.ONLINE, ts=T0,
                                   agent_version="0.1.0")))
    online = device(migrated_engine, "pi-0")
    clock.now += 30
    writer.write(incoming(Presence(device_id="pi-0", state=PresenceState.OFFLINE, ts=T0 + 30)))
    offline = device(migrated_engine, "pi-0")

    assert (online["online"], online["last_seen"], online["agent_version"]) == (
        True, T0 + 1_000, "0.1.0")
    # Offline keeps when it was last seen, and an empty agent version keeps the known one.
    assert (offline["online"], offline["last_seen"], offline["agent_version"]) == (
        False, T0 + 1_000, "0.1.0")


def test_the_last_presence_in_a_batch_wins(migrated_engine: Engine) -> None:
    writer = PresenceWriter(migrated_engine, clock=Clock())

    writer.write(incoming(Presence(device_id="pi-0", state=PresenceState.ONLINE, ts=T0),
                          Presence(device_id="pi-0", state=PresenceState.OFFLINE, ts=T0 + 1)))

    assert device(migrated_engine, "pi-0")["online"] is False


def test_a_presence_state_from_a_newer_agent_only_touches_the_device(
        migrated_engine: Engine) -> None:
    payload = patched_json(encode(Presence(device_id="pi-0", state=PresenceState.ONLINE,
                                           ts=T0)), state="hibernating")
    writer = PresenceWriter(migrated_engine, clock=Clock())

    result = writer.write([("pi-0", payload)])

    assert result == WriteResult(stored=1)
    assert device(migrated_engine, "pi-0")["last_seen"] == T0 + 1_000


def facts(device_id: str, *, ts: float = T0, profile: str | None = "coral-usb-rpi4",
          active: ActiveModel | None = V2) -> DeviceFacts:
    return DeviceFacts(
        device_id=device_id, ts=ts, profile=profile, agent_version="0.1.0", active_model=active,
        hardware=HardwareFacts(arch="aarch64", machine_model="Raspberry Pi 4 Model B",
                               cpu_cores=4, memory_mb=3_794, usb_ids=("18d1:9302",)))


def test_facts_upsert_profile_hardware_and_active_model(migrated_engine: Engine) -> None:
    writer = FactsWriter(migrated_engine, clock=Clock())

    writer.write(incoming(facts("pi-0"), facts("x86-0", profile=None, active=None)))

    known, unknown = device(migrated_engine, "pi-0"), device(migrated_engine, "x86-0")
    assert (known["profile"], known["hardware_known"], known["active_model_version"],
            known["agent_version"]) == ("coral-usb-rpi4", True, 2, "0.1.0")
    assert known["facts"]["hardware"]["usb_ids"] == ["18d1:9302"]
    assert known["facts"]["runtimes"] == []
    assert (unknown["profile"], unknown["hardware_known"], unknown["active_model_name"]) == (
        None, False, None)


def test_facts_complete_a_device_first_registered_by_its_telemetry(
        migrated_engine: Engine) -> None:
    TelemetryWriter(migrated_engine, clock=Clock()).write(incoming(window("pi-0", SEQ0)))

    FactsWriter(migrated_engine, clock=Clock()).write(incoming(facts("pi-0", ts=T0 + 50)))

    found = device(migrated_engine, "pi-0")
    assert (found["hardware_known"], found["profile"], found["online"]) == (
        True, "coral-usb-rpi4", True)
    assert found["active_execution"] == "litert/edgetpu"  # same artifact: how it runs holds


def test_stale_retained_facts_do_not_move_the_active_model_back(
        migrated_engine: Engine) -> None:
    TelemetryWriter(migrated_engine, clock=Clock()).write(
        incoming(window("pi-0", SEQ0, end=T0 + 500, model=V3)))

    FactsWriter(migrated_engine, clock=Clock()).write(incoming(facts("pi-0", ts=T0, active=V2)))

    assert device(migrated_engine, "pi-0")["active_model_version"] == 3


def test_newer_facts_with_another_model_clear_how_it_runs(migrated_engine: Engine) -> None:
    TelemetryWriter(migrated_engine, clock=Clock()).write(
        incoming(window("pi-0", SEQ0, end=T0, model=V2)))

    FactsWriter(migrated_engine, clock=Clock()).write(
        incoming(facts("pi-0", ts=T0 + 100, active=V3)))

    found = device(migrated_engine, "pi-0")
    assert (found["active_model_version"], found["active_execution"]) == (3, None)


def test_heartbeats_move_last_seen(migrated_engine: Engine) -> None:
    clock = Clock()
    writer = HeartbeatWriter(migrated_engine, clock=clock)
    writer.write(incoming(Heartbeat(device_id="pi-0", ts=T0, uptime_s=5.0)))
    clock.now += 15

    writer.write(incoming(Heartbeat(device_id="pi-0", ts=T0 + 15, uptime_s=20.0)))

    assert device(migrated_engine, "pi-0")["last_seen"] == clock.now


def test_command_statuses_are_appended_in_arrival_order(migrated_engine: Engine) -> None:
    writer = StatusWriter(migrated_engine, clock=Clock())
    statuses = [CommandStatus(device_id="pi-0", command_id="cmd-1", kind="deploy", state=state,
                              ts=T0 + i, stage=stage, model_name="digits", model_version=3)
                for i, (state, stage) in enumerate([
                    (CommandState.ACCEPTED, InstallStage.RECEIVED),
                    (CommandState.IN_PROGRESS, InstallStage.STAGED),
                    (CommandState.SUCCEEDED, InstallStage.COMMITTED)])]

    result = writer.write(incoming(*statuses, statuses[1]))  # a redelivery is appended too

    assert result == WriteResult(stored=4)
    stored = rows(migrated_engine, "SELECT state, stage, ts, received_at FROM command_statuses "
                                   "WHERE command_id = 'cmd-1' ORDER BY id")
    assert [(r["state"], r["stage"]) for r in stored] == [
        ("accepted", "received"), ("in-progress", "staged"), ("succeeded", "committed"),
        ("in-progress", "staged")]
    assert {r["received_at"] for r in stored} == {T0 + 1_000}
    assert device(migrated_engine, "pi-0")["hardware_known"] is False  # registered on the fly


def test_a_status_for_another_device_is_rejected(migrated_engine: Engine) -> None:
    status = CommandStatus(device_id="pi-1", command_id="cmd-1", kind="deploy",
                           state=CommandState.FAILED, ts=T0, reason="boom")

    result = StatusWriter(migrated_engine).write([("pi-0", encode(status))])

    assert result.malformed == [
        Rejected("pi-0", "payload says device_id 'pi-1', the topic says 'pi-0'")]


# --- views -------------------------------------------------------------------------------------

def test_fleet_status_shows_each_devices_latest_p95_and_accuracy(
        migrated_engine: Engine) -> None:
    writer = TelemetryWriter(migrated_engine, clock=Clock())
    FactsWriter(migrated_engine, clock=Clock()).write(incoming(facts("pi-0", ts=T0 - 100)))
    PresenceWriter(migrated_engine, clock=Clock()).write(
        incoming(Presence(device_id="pi-0", state=PresenceState.ONLINE, ts=T0)))
    # The newest window arrives first; the older one, replayed late, must not win.
    writer.write(incoming(window("pi-0", SEQ0 + 1, p95=4.0, accuracy=0.97),
                          window("pi-1", SEQ0, p95=9.5, accuracy=None, model=V3)))
    writer.write(incoming(window("pi-0", SEQ0, p95=7.0, accuracy=0.5)))

    status = rows(migrated_engine, "SELECT * FROM fleet_status ORDER BY device_id")

    assert [(s["device_id"], s["profile"], bool(s["online"]), s["model_name"],
             s["model_version"], s["variant_kind"], s["p95_ms"], s["accuracy"],
             s["deployment_state"]) for s in status] == [
        ("pi-0", "coral-usb-rpi4", True, "digits", 2, "tflite-int8", 4.0, 0.97, None),
        ("pi-1", None, True, "digits", 3, "onnx-int8", 9.5, None, None)]
    assert str(status[0]["telemetry_at"]).startswith("2026-11-18")  # readable, not epoch


def seed_rollout(engine: Engine, deployments: list[tuple[str, int, str]]) -> None:
    """A model, a version, rollout ro-0001 with groups canary and wave-1, and deployments."""
    with engine.begin() as connection:
        for device_id in sorted({d for d, _, _ in deployments}):
            connection.execute(text(
                "INSERT INTO devices (id, labels, hardware_known, facts, online, first_seen, "
                "agent_version) VALUES (:id, '{}', true, '{}', true, 1.0, '')"), {"id": device_id})
        connection.execute(text("INSERT INTO models (name, created_at) VALUES ('digits', 1.0)"))
        connection.execute(text(
            "INSERT INTO model_versions (model_id, version, source_sha256, source_file, "
            "created_at) SELECT id, 3, 'ab', 'digits.onnx', 1.0 FROM models"))
        connection.execute(text(
            "INSERT INTO rollouts (id, name, model_version_id, state, target, config, "
            "current_group, created_at, engine_state) SELECT 'ro-0001', 'digits v3', id, "
            "'running', '{}', '{}', 1, 1.0, '{}' FROM model_versions"))
        for position, name, state, gates in [
                (0, "canary", "passed", '[{"gate": "accuracy", "passed": true}]'),
                (1, "wave-1", "deploying", "[]")]:
            connection.execute(text(
                "INSERT INTO rollout_groups (rollout_id, position, name, state, started_at, "
                "gate_results) VALUES ('ro-0001', :p, :n, :s, :t, :g)"),
                {"p": position, "n": name, "s": state, "t": T0, "g": gates})
        for i, (device_id, position, state) in enumerate(deployments):
            connection.execute(text(
                "INSERT INTO deployments (rollout_id, group_position, device_id, state, "
                "attempts, updated_at, reason) VALUES ('ro-0001', :p, :d, :s, 1, :u, '')"),
                {"p": position, "d": device_id, "s": state, "u": T0 + i})


def test_rollout_progress_counts_deployments_by_outcome_per_group(
        migrated_engine: Engine) -> None:
    seed_rollout(migrated_engine, [
        ("pi-0", 0, "succeeded"), ("pi-1", 0, "succeeded"), ("pi-2", 0, "rolled-back"),
        ("pi-3", 1, "succeeded"), ("pi-4", 1, "failed"), ("pi-5", 1, "timed-out"),
        ("pi-6", 1, "sent"), ("pi-7", 1, "pending"), ("pi-8", 1, "cancelled")])

    progress = rows(migrated_engine, "SELECT * FROM rollout_progress ORDER BY group_position")

    assert [(p["group_name"], p["group_state"], p["targeted"], p["succeeded"], p["failed"],
             p["timed_out"], p["cancelled"], p["pending"]) for p in progress] == [
        ("canary", "passed", 3, 2, 1, 0, 0, 0),
        ("wave-1", "deploying", 6, 1, 1, 1, 1, 2)]
    gates = progress[0]["gate_results"]
    gates = msgspec.json.decode(gates) if isinstance(gates, str) else gates
    assert gates == [{"gate": "accuracy", "passed": True}]
    assert progress[0]["rollout_id"] == "ro-0001"


def test_fleet_status_shows_the_latest_deployment_of_each_device(
        migrated_engine: Engine) -> None:
    seed_rollout(migrated_engine, [("pi-0", 0, "succeeded"), ("pi-1", 1, "sent")])

    status = rows(migrated_engine, "SELECT device_id, rollout_id, deployment_state "
                                   "FROM fleet_status ORDER BY device_id")

    assert status == [
        {"device_id": "pi-0", "rollout_id": "ro-0001", "deployment_state": "succeeded"},
        {"device_id": "pi-1", "rollout_id": "ro-0001", "deployment_state": "sent"}]
