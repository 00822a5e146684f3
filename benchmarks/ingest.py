"""Telemetry windows stored per second by the controller's ingest path, against a bare paho
subscriber receiving the same stream, on SQLite and PostgreSQL, all measured in this one run.

    python benchmarks/ingest.py [--messages 30000] [--batch 500] [--flush-ms 50] [--rounds 3]

How: a real Mosquitto (tests/broker.py) on 127.0.0.1. For each measurement the subscriber's
persistent session subscribes and goes away; publisher processes publish the stream (QoS 1
TelemetryBatch JSON from --devices devices, every message acknowledged by the broker); then
the subscriber comes back and drains it. The rate is messages over the time from its reconnect
to the last message handled, so only the receiving process sets the pace:

- bare: paho's on_message counts; paho acknowledges each message when the callback returns.
- ingest: on_message only queues (topic, payload, mid); a writer thread takes a batch (--batch
  messages, or whatever came within --flush-ms of the first), parses each topic with the
  contract's TopicSchema, calls TelemetryWriter.write (one transaction) and only then
  acknowledges the batch's messages (manual acks: nothing is acknowledged before it is stored).

- queue: the ingest receiver with a writer that stores nothing: the same batching and acks,
  so ingest against queue is what the database costs.

The three alternate, --rounds times each, ingest on a fresh database each time; medians count.
Target: ingest >= 0.9x bare on each backend. Exits 1 when a target is missed.

PostgreSQL: --pg-url, else EDGEFLEET_TEST_PG_URL, else the local server (127.0.0.1:5432, user
postgres), else a throwaway cluster (tests/db_fixtures.py) with durable default settings.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402
from sqlalchemy.engine import URL, make_url  # noqa: E402

from controller.db import make_engine, upgrade  # noqa: E402
from controller.db.ingest import TelemetryWriter, WriteResult  # noqa: E402
from controller.db.schema import Telemetry  # noqa: E402
from edgefleet.contract import (  # noqa: E402
    ActiveModel,
    Channel,
    LatencyStats,
    TelemetryBatch,
    TopicSchema,
    VariantKind,
    encode,
)
from tests.broker import HOST, MosquittoBroker  # noqa: E402

TARGET = 0.9
SEQ0 = 1_800_000_000_000
MODEL = ActiveModel(model_name="digits", model_version=2, variant_kind=VariantKind.TFLITE_INT8,
                    artifact_id="digits-v2-tflite-int8-1f3a")


# --- publishers (separate processes) -----------------------------------------------------------

def publish(port: int, root: str, devices: list[str], per_device: int, first_seq: int) -> None:
    """Publishes `per_device` windows for each device, interleaved, and waits for every PUBACK."""
    schema = TopicSchema(root)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(1_000)
    acked = threading.Semaphore(0)
    client.on_publish = lambda *_: acked.release()
    client.connect(HOST, port)
    client.loop_start()
    topics = {d: schema.build(Channel.TELEMETRY, d) for d in devices}
    sent = 0
    for j in range(per_device):
        for device in devices:
            end = 1_795_000_000.0 + 10 * j
            window = TelemetryBatch(
                device_id=device, seq=first_seq + j, window_start=end - 10, window_end=end,
                model=MODEL, execution="litert/edgetpu", inferences=1_000, errors=0,
                throughput_ips=100.0, latency=LatencyStats(p50_ms=2.5, p95_ms=3.75, p99_ms=4.5,
                                                           max_ms=9.0),
                labelled=1_000, accuracy=0.96, agreement=0.99, cpu_percent=12.5, rss_mb=61.25,
                temperature_c=48.3)
            client.publish(topics[device], encode(window), qos=1)
            sent += 1
    for _ in range(sent):
        if not acked.acquire(timeout=60):
            raise SystemExit("publisher: the broker stopped acknowledging")
    close(client)


def preload(port: int, root: str, devices: int, messages: int, publishers: int,
            first_seq: int) -> None:
    names = [f"dev-{i:05d}" for i in range(devices)]
    per_device = messages // devices
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=publish, args=(port, root, names[k::publishers],
                                                        per_device, first_seq))
                 for k in range(publishers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"a publisher failed with exit code {process.exitcode}")


# --- the two receivers -------------------------------------------------------------------------

def subscriber(port: int, client_id: str, *, manual_ack: bool,
               on_message: Callable[..., None] | None = None) -> mqtt.Client:
    """A persistent-session MQTT 5 client, not yet connected."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv5, manual_ack=manual_ack)
    client.on_message = on_message
    return client


def connect(client: mqtt.Client, port: int, connected: threading.Event,
            receive_maximum: int = 65_535) -> None:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3_600
    properties.ReceiveMaximum = receive_maximum
    client.on_connect = lambda *_: connected.set()
    client.connect(HOST, port, clean_start=False, properties=properties)


def close(client: mqtt.Client) -> None:
    # Stop the loop first: paho's loop_stop() races the loop thread's own exit after a
    # disconnect (it can find _thread gone mid-call). disconnect() then writes directly.
    client.loop_stop()
    client.disconnect()


def create_session(port: int, client_id: str, topic_filter: str) -> None:
    client = subscriber(port, client_id, manual_ack=False)
    connected, subscribed = threading.Event(), threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    connect(client, port, connected)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("no CONNACK")
    client.subscribe(topic_filter, qos=1)
    if not subscribed.wait(10):
        raise SystemExit("no SUBACK")
    close(client)


@dataclass(frozen=True)
class Drain:
    messages: int
    seconds: float
    cpu_seconds: float
    batches: int = 0
    stored: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def drain_bare(port: int, client_id: str, messages: int, receive_maximum: int) -> Drain:
    done = threading.Event()
    count = 0

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count == messages:
            done.set()

    client = subscriber(port, client_id, manual_ack=False, on_message=on_message)
    cpu, start = time.process_time(), time.perf_counter()
    connect(client, port, threading.Event(), receive_maximum)
    client.loop_start()
    if not done.wait(600):
        raise SystemExit(f"bare: only {count} of {messages} messages arrived")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    close(client)
    return Drain(messages, seconds, cpu)


class BatchingReceiver:
    """The stand-in for the controller's MQTT adapter: paho's thread only queues; one writer
    thread batches, stores, then acknowledges."""

    def __init__(self, write: Callable[[list[tuple[str, bytes]]], WriteResult],
                 schema: TopicSchema, batch: int, flush_s: float) -> None:
        self.write, self.schema, self.batch, self.flush_s = write, schema, batch, flush_s
        self.inbox: queue.SimpleQueue[tuple[str, bytes, int]] = queue.SimpleQueue()
        self.handled = self.batches = self.stored = 0

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.inbox.put((message.topic, bytes(message.payload), message.mid))

    def take(self) -> list[tuple[str, bytes, int]]:
        """The next batch: up to `batch` messages, or what came within `flush_s` of the first."""
        items = [self.inbox.get()]
        deadline = time.monotonic() + self.flush_s
        while len(items) < self.batch:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    items.append(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        return items

    def run(self, client: mqtt.Client, total: int, done: threading.Event) -> None:
        parse = self.schema.parse
        while self.handled < total:
            items = self.take()
            result = self.write([(parse(topic).device_id, payload)
                                 for topic, payload, _ in items])
            for _, _, mid in items:
                client.ack(mid, 1)
            self.handled += len(items)
            self.batches += 1
            self.stored += result.stored
        done.set()


def store_nothing(items: list[tuple[str, bytes]]) -> WriteResult:
    return WriteResult(stored=len(items))


def drain_batching(port: int, client_id: str, messages: int, url: str | None,
                   schema: TopicSchema, batch: int, flush_s: float,
                   receive_maximum: int) -> Drain:
    """Drains through BatchingReceiver into the database at `url`, or into nothing."""
    engine = None
    write: Callable[[list[tuple[str, bytes]]], WriteResult] = store_nothing
    if url is not None:
        engine = make_engine(url)
        upgrade(engine)
        write = TelemetryWriter(engine).write
    receiver = BatchingReceiver(write, schema, batch, flush_s)
    client = subscriber(port, client_id, manual_ack=True, on_message=receiver.on_message)
    done = threading.Event()
    cpu, start = time.process_time(), time.perf_counter()
    threading.Thread(target=receiver.run, args=(client, messages, done), daemon=True).start()
    connect(client, port, threading.Event(), receive_maximum)
    client.loop_start()
    if not done.wait(600):
        raise SystemExit(f"ingest: only {receiver.handled} of {messages} messages handled")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    close(client)
    if engine is None:
        return Drain(messages, seconds, cpu, receiver.batches, receiver.stored)
    with engine.connect() as connection:
        in_table = connection.execute(select(func.count()).select_from(Telemetry)).scalar_one()
    engine.dispose()
    if in_table != messages or receiver.stored != messages:
        raise SystemExit(f"ingest stored {receiver.stored}, the table holds {in_table}, "
                         f"expected {messages}")
    return Drain(messages, seconds, cpu, receiver.batches, receiver.stored)


# --- databases ---------------------------------------------------------------------------------

@contextmanager
def postgres_admin(given: str | None) -> Iterator[tuple[URL, str]]:
    """An admin URL to create benchmark databases on, and where it came from."""
    for candidate, source in ((given, "--pg-url"),
                              (os.environ.get("EDGEFLEET_TEST_PG_URL"), "EDGEFLEET_TEST_PG_URL"),
                              ("postgresql://postgres@127.0.0.1:5432/postgres", "local server")):
        if not candidate:
            continue
        url = make_url(candidate).set(drivername="postgresql+psycopg")
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect():
                pass
        except Exception:
            continue
        finally:
            engine.dispose()
        yield url, source
        return
    from tests.db_fixtures import ThrowawayCluster
    cluster = ThrowawayCluster()
    try:
        yield cluster.start(durable=True), "throwaway cluster (default durability)"
    finally:
        cluster.stop()


@contextmanager
def fresh_database(backend: str, admin: URL | None, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        path = directory / f"bench-{uuid.uuid4().hex[:8]}.db"
        yield f"sqlite:///{path}"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    assert admin is not None
    name = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


# --- the run -----------------------------------------------------------------------------------

KINDS = ("bare", "queue", "ingest")


def measure(backend: str, admin: URL | None, args: argparse.Namespace, broker: MosquittoBroker,
            directory: Path) -> dict[str, list[Drain]]:
    drains: dict[str, list[Drain]] = {kind: [] for kind in KINDS}
    messages = args.messages // args.devices * args.devices
    for round_ in range(args.rounds):
        for kind in KINDS:
            schema = TopicSchema(f"b{uuid.uuid4().hex[:8]}/edgefleet")
            client_id = f"controller-{uuid.uuid4().hex[:8]}"
            create_session(broker.port, client_id, schema.filter(Channel.TELEMETRY))
            preload(broker.port, schema.root, args.devices, messages, args.publishers,
                    SEQ0 + round_ * 1_000_000)
            if kind == "bare":
                drain = drain_bare(broker.port, client_id, messages, args.receive_maximum)
            elif kind == "queue":
                drain = drain_batching(broker.port, client_id, messages, None, schema,
                                       args.batch, args.flush_ms / 1000, args.receive_maximum)
            else:
                with fresh_database(backend, admin, directory) as url:
                    drain = drain_batching(broker.port, client_id, messages, url, schema,
                                           args.batch, args.flush_ms / 1000,
                                           args.receive_maximum)
            drains[kind].append(drain)
            extra = (f", {drain.batches} batches (mean {drain.messages / drain.batches:.0f})"
                     if drain.batches else "")
            print(f"  {backend:<10} round {round_ + 1} {kind:<6} {drain.rate:8.0f} msg/s  "
                  f"({drain.messages} in {drain.seconds:.2f} s, CPU "
                  f"{drain.cpu_seconds / drain.messages * 1e6:.0f} µs/msg{extra})", flush=True)
    return drains


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500, help="flush at this many messages")
    parser.add_argument("--flush-ms", type=float, default=50.0,
                        help="or this long after the batch's first message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", help="admin URL of a PostgreSQL to benchmark on")
    parser.add_argument("--receive-maximum", type=int, default=65_535,
                        help="MQTT 5 Receive Maximum the subscriber asks for: how many messages "
                             "may await its ack. Keep it above --batch, since acks wait for the "
                             "commit; without it Mosquitto sends 20 and waits")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    checks: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        directory = Path(tmp)
        broker = MosquittoBroker(directory / "mosquitto",
                                 extra_config=["max_queued_messages 0"]).start()
        try:
            with postgres_if("postgresql" in backends, args.pg_url) as pg:
                admin, source = pg
                print(f"ingest benchmark: {args.messages // args.devices * args.devices} QoS 1 "
                      f"windows from {args.devices} devices, batch {args.batch} / "
                      f"{args.flush_ms:g} ms, {args.rounds} rounds; cpus={os.cpu_count()}")
                if admin is not None:
                    print(f"PostgreSQL: {source} ({admin.render_as_string(hide_password=True)})")
                for backend in backends:
                    drains = measure(backend, admin, args, broker, directory)
                    bare_rate, queue_rate, ingest_rate = (
                        statistics.median(d.rate for d in drains[kind]) for kind in KINDS)
                    ratio = ingest_rate / bare_rate
                    print(f"  {backend:<10} median: bare {bare_rate:.0f} msg/s, queue "
                          f"{queue_rate:.0f} msg/s, ingest {ingest_rate:.0f} stored/s = "
                          f"{ratio:.2f}x bare, {ingest_rate / queue_rate:.2f}x queue",
                          flush=True)
                    checks.append((f"{backend} ingest >= {TARGET}x bare subscriber",
                                   ratio >= TARGET,
                                   f"{ratio:.2f}x ({ingest_rate:.0f} vs {bare_rate:.0f} msg/s)"))
        finally:
            broker.stop()
    print()
    for name, ok, figure in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name:<45} {figure}")
    return 0 if all(ok for _, ok, _ in checks) else 1


@contextmanager
def postgres_if(wanted: bool,
                                 given: str | None) -> Iterator[tuple[URL | None, str]]:
    if not wanted:
        yield None, ""
        return
    with postgres_admin(given) as found:
        yield found


if __name__ == "__main__":
    sys.exit(main())
