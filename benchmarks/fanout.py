"""A 50 KB artifact installed on N simulated agents through the controller's distribution path,
against a raw MQTT fan-out of the same bytes to the same connections. Target: <= 2x raw.

    python benchmarks/fanout.py [--devices 1000] [--size 51200] [--processes 4] [--rounds 3]

How: a Mosquitto of our own on 127.0.0.1 (max_queued_messages 10000, no connection limit, quiet
log). The agents are benchmarks/sim_agents.py: --processes processes, each holding its share of
--devices real MQTT connections (one per device, subscribed like an agent) on one selector loop.

- edgefleet: the real `edgefleet serve` Controller (controller/service.py: ControllerLink,
  ingest into SQLite, ChunkServer, CommandIssuer) on a temp home with the artifact registered
  as a variant. The clock starts, and the issuer signs and publishes one DeployCommand per
  device; each device verifies the manifest, reports ACCEPTED, pulls the chunks in windows,
  checks the sha256 and reports SUCCEEDED. Done when the controller has stored every device's
  SUCCEEDED status ("controller knows"); also shown: the last device to finish ("devices").
- raw: a plain paho publisher (MQTT 5, the same in-flight window as the controller's link)
  publishes the same bytes in the same chunk sizes, QoS 1, to every device's chunk topic. Done
  when the last device holds all the bytes.

The two alternate --rounds times; medians count. The ratio is edgefleet (controller knows) over
raw. Exits 1 when it is above --target (2.0).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import multiprocessing
import os
import queue
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
import psutil  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from sqlalchemy import Engine, func, insert, select  # noqa: E402

from benchmarks.sim_agents import simulate  # noqa: E402
from controller.db import make_engine, upgrade  # noqa: E402
from controller.db.schema import CommandStatusRow, Model, ModelVersion, Variant  # noqa: E402
from controller.keys import create_signing_key  # noqa: E402
from controller.rollout.events import DeployTo  # noqa: E402
from controller.service import Controller  # noqa: E402
from controller.settings import BrokerSection, ControllerSettings  # noqa: E402
from edgefleet.contract import (  # noqa: E402
    Channel,
    FileFormat,
    Runtime,
    RuntimeRequirement,
    TopicSchema,
    VariantKind,
)
from tests.broker import MosquittoBroker  # noqa: E402

TARGET = 2.0
PER_PROCESS = 250
BROKER_CONFIG = ["max_queued_messages 10000", "max_connections -1",
                 # tests/broker.py logs everything; a line per message would be the bottleneck.
                 "log_type none", "log_type error", "log_type warning",
                 "connection_messages false"]


def raise_fd_limit(wanted: int) -> int:
    """Raises the soft open-files limit (inherited by Mosquitto and the simulators)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


# --- the simulated fleet -------------------------------------------------------------------------

@dataclass
class Fleet:
    """The simulator processes, and a thread that turns their pipes into one queue."""

    pipes: list[Connection]
    processes: list[Any]
    events: queue.Queue[tuple[int, tuple[Any, ...]]] = field(default_factory=queue.Queue)

    def start_reader(self) -> None:
        threading.Thread(target=self._read, daemon=True, name="sim-pipes").start()

    def _read(self) -> None:
        open_pipes = dict(enumerate(self.pipes))
        while open_pipes:
            ready = wait(list(open_pipes.values()), timeout=0.5)
            for index, pipe in list(open_pipes.items()):
                if pipe not in ready:
                    continue
                try:
                    self.events.put((index, pipe.recv()))
                except EOFError:
                    del open_pipes[index]

    def expect(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        """One `kind` message from every simulator; raises on an error or a timeout."""
        got: dict[int, tuple[Any, ...]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.pipes):
            index, message = self._next(deadline, f"{kind} from every simulator")
            if message[0] == kind:
                got[index] = message
        return [got[i] for i in range(len(self.pipes))]

    def _next(self, deadline: float, what: str) -> tuple[int, tuple[Any, ...]]:
        try:
            index, message = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"timed out waiting for {what}") from None
        if message[0] == "error":
            raise RuntimeError(f"simulator {index}: {message[1]}")
        return index, message

    def arm(self, *command: Any) -> int:
        for pipe in self.pipes:
            pipe.send(command)
        return sum(m[1] for m in self.expect("armed", 30))

    def finished(self, devices: int, timeout: float) -> tuple[list[float], list[str]]:
        """Waits until every device is done or failed: (done times, failures)."""
        times: list[float] = []
        failures: list[str] = []
        deadline = time.monotonic() + timeout
        while len(times) + len(failures) < devices:
            _, message = self._next(deadline, f"{devices} devices (done {len(times)}, failed "
                                              f"{len(failures)})")
            if message[0] == "done":
                times += [t for _, t in message[1]]
            elif message[0] == "failed":
                failures += [f"{d}: {why}" for d, why in message[1]]
        return times, failures

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):          # that simulator already died
                pipe.send(("stop",))
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def start_fleet(port: int, root: str, device_ids: list[str], trusted: dict[str, bytes],
                processes: int, window: int, chunk_timeout_s: float) -> Fleet:
    context = multiprocessing.get_context("fork")
    pipes, children = [], []
    per = math.ceil(len(device_ids) / processes)
    for start in range(0, len(device_ids), per):
        mine, theirs = context.Pipe()
        child = context.Process(target=simulate, daemon=True, args=(
            port, root, device_ids[start:start + per], trusted, theirs, window, chunk_timeout_s))
        child.start()
        theirs.close()
        pipes.append(mine)
        children.append(child)
    fleet = Fleet(pipes, children)
    fleet.start_reader()
    return fleet


# --- the controller ------------------------------------------------------------------------------

def register_artifact(db: Engine, path: Path, data: bytes) -> int:
    """Registers `path` as a model variant the way `models add` would; returns its id."""
    now = time.time()
    with db.begin() as conn:
        model_id = conn.execute(insert(Model).values(name="fanout", created_at=now)
                                .returning(Model.id)).scalar_one()
        version_id = conn.execute(insert(ModelVersion).values(
            model_id=model_id, version=1, source_sha256="0" * 64, source_file=str(path),
            created_at=now).returning(ModelVersion.id)).scalar_one()
        return int(conn.execute(insert(Variant).values(
            model_version_id=version_id, artifact_id=f"fanout-v1-{len(data)}",
            kind=VariantKind.ONNX_FP32.value, file_format=FileFormat.ONNX.value,
            runtime=msgspec.to_builtins(RuntimeRequirement(runtime=Runtime.ONNXRUNTIME)),
            sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), file=str(path),
            accuracy=0.9, built_at=now).returning(Variant.id)).scalar_one())


def start_controller(home: Path, port: int, root: str, artifact: bytes
                     ) -> tuple[Controller, int, tuple[threading.Thread, threading.Event]]:
    """`edgefleet serve`'s Controller on `home` (its signing key already there), running."""
    settings = ControllerSettings(
        database_url=f"sqlite:///{home / 'fleet.db'}",
        broker=BrokerSection(port=port, topic_root=root, client_id="fanout-controller"))
    db = make_engine(settings.database_url)
    upgrade(db)
    path = home / "artifacts" / "fanout.bin"
    path.parent.mkdir()
    path.write_bytes(artifact)
    variant_id = register_artifact(db, path, artifact)
    db.dispose()
    controller = Controller(home, settings)
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, args=(stop,), daemon=True, name="serve")
    thread.start()
    deadline = time.monotonic() + 15
    while not controller.link.connected:
        if time.monotonic() > deadline:
            raise RuntimeError("the controller did not connect to the broker")
        time.sleep(0.05)
    return controller, variant_id, (thread, stop)


def stored_successes(db: Engine, prefix: str) -> tuple[int, float | None]:
    with db.connect() as conn:
        count, newest = conn.execute(
            select(func.count(func.distinct(CommandStatusRow.device_id)),
                   func.max(CommandStatusRow.received_at))
            .where(CommandStatusRow.command_id.like(f"{prefix}:%"),
                   CommandStatusRow.state == "succeeded")).one()
    return int(count), newest


# --- the rounds ----------------------------------------------------------------------------------

class CpuMeter:
    """CPU seconds used by this process (the controller, or the raw publisher), the broker and
    the simulators: on a small machine the simulated fleet competes with the controller."""

    def __init__(self, broker_pid: int, simulator_pids: list[int]) -> None:
        self.groups = {"controller": [psutil.Process()], "broker": [psutil.Process(broker_pid)],
                       "simulators": [psutil.Process(pid) for pid in simulator_pids]}

    def read(self) -> dict[str, float]:
        return {name: sum(sum(p.cpu_times()[:2]) for p in processes)
                for name, processes in self.groups.items()}


@dataclass
class Round:
    kind: str
    seconds: float                      # raw: the last device done; edgefleet: controller knows
    cpu: dict[str, float]
    devices_s: float = 0.0              # edgefleet: the last device done
    issued_s: float = 0.0               # edgefleet: every deploy command signed and published
    requests: int = 0                   # edgefleet: chunk requests the devices sent
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        cpu = ", ".join(f"{name} {seconds:.2f}" for name, seconds in self.cpu.items())
        extra = (f"; devices {self.devices_s:.2f} s, commands issued in {self.issued_s:.2f} s, "
                 f"{self.requests} chunk requests" if self.kind == "edgefleet" else "")
        problems = (f"; {len(self.failures)} FAILED: {self.failures[:3]}" if self.failures
                    else "")
        return f"{self.kind:<9} {self.seconds:6.2f} s{extra} (cpu s: {cpu}){problems}"


def raw_round(fleet: Fleet, meter: CpuMeter, port: int, schema: TopicSchema,
              device_ids: list[str], artifact: bytes, chunk_size: int, timeout: float) -> Round:
    fleet.arm("raw", len(artifact))
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}",
                            protocol=paho.MQTTv5)
    # No paho window (0): every publish goes out at once, and no PUBACK rescans the rest.
    publisher.max_inflight_messages_set(0)
    publisher.max_queued_messages_set(0)
    connected = threading.Event()
    publisher.on_connect = lambda *_: connected.set()
    publisher.connect("127.0.0.1", port, keepalive=60)
    publisher.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("the raw publisher did not connect")
        chunks = [artifact[i:i + chunk_size] for i in range(0, len(artifact), chunk_size)]
        before = meter.read()
        started = time.monotonic()
        for device_id in device_ids:
            topic = schema.build(Channel.CHUNK, device_id)
            for chunk in chunks:
                publisher.publish(topic, chunk, qos=1)
        times, failures = fleet.finished(len(device_ids), timeout)
        cpu = _spent(before, meter.read())
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    return Round("raw", max(times, default=started) - started, cpu, failures=failures)


def edgefleet_round(fleet: Fleet, meter: CpuMeter, controller: Controller, variant_id: int,
                    device_ids: list[str], label: str, timeout: float) -> Round:
    fleet.arm("contract")
    issue: Callable[[DeployTo, dict[str, Any]], bool] = controller.issuer
    before = meter.read()
    started, wall = time.monotonic(), time.time()
    for device_id in device_ids:
        issue(DeployTo(rollout_id=label, group=0, device_id=device_id,
                       variant_id=str(variant_id), command_id=f"{label}:{device_id}:deploy:1",
                       attempt=1), {"watch_s": 1.0})
    issued_s = time.monotonic() - started
    times, failures = fleet.finished(len(device_ids), timeout)
    devices_s = max(times, default=started) - started
    deadline = time.monotonic() + timeout
    while True:
        count, newest = stored_successes(controller.db, label)
        if count >= len(times) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    cpu = _spent(before, meter.read())
    if count < len(times):
        failures.append(f"the controller stored {count} of {len(times)} successes")
    knows = (newest - wall) if newest is not None else math.inf
    requests = fleet.arm("idle")                   # answers with the round's request count
    return Round("edgefleet", knows, cpu, devices_s, issued_s, requests, failures)


def _spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--size", type=int, default=50 * 1024, help="artifact bytes")
    parser.add_argument("--processes", type=int, default=0,
                        help=f"simulator processes (default: one per {PER_PROCESS} devices)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=8, help="chunks per request (agent: 8)")
    parser.add_argument("--chunk-timeout", type=float, default=5.0,
                        help="seconds before a device asks again for missing chunks")
    parser.add_argument("--target", type=float, default=TARGET)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  (%(name)s: %(message)s)")
    processes = args.processes or max(1, math.ceil(args.devices / PER_PROCESS))
    limit = raise_fd_limit(args.devices * 2 + 1024)
    timeout = max(60.0, args.devices * 0.1)
    root = f"fanout{uuid.uuid4().hex[:6]}/edgefleet"
    schema = TopicSchema(root)
    device_ids = [f"sim-{i:05d}" for i in range(args.devices)]
    artifact = os.urandom(args.size)
    rounds: dict[str, list[Round]] = {"raw": [], "edgefleet": []}

    with tempfile.TemporaryDirectory(prefix="edgefleet-fanout-") as tmp:
        directory = Path(tmp)
        broker = MosquittoBroker(directory / "mosquitto", extra_config=BROKER_CONFIG).start()
        home = directory / "home"
        home.mkdir()
        fleet: Fleet | None = None
        serving: tuple[threading.Thread, threading.Event] | None = None
        try:
            # The devices trust the fleet key; the simulators fork before any thread exists.
            key = create_signing_key(home / "keys")
            began = time.monotonic()
            fleet = start_fleet(broker.port, root, device_ids, {key.key_id: key.public_pem},
                                processes, args.window, args.chunk_timeout)
            connected = sum(m[1] for m in fleet.expect("ready", timeout))
            print(f"fan-out benchmark: {args.size} bytes to {connected} simulated agents (real "
                  f"MQTT connections from {len(fleet.processes)} processes, all subscribed in "
                  f"{time.monotonic() - began:.1f} s); {args.rounds} rounds; "
                  f"cpus={os.cpu_count()}, open files limit {limit}", flush=True)
            assert broker.pid is not None
            meter = CpuMeter(broker.pid, [p.pid for p in fleet.processes])
            controller, variant_id, serving = start_controller(home, broker.port, root,
                                                               artifact)
            for number in range(1, args.rounds + 1):
                raw = raw_round(fleet, meter, broker.port, schema, device_ids, artifact,
                                controller.settings.chunk_size, timeout)
                print(f"  round {number} {raw.line()}", flush=True)
                ours = edgefleet_round(fleet, meter, controller, variant_id, device_ids,
                                       f"fanout-{number}", timeout)
                print(f"  round {number} {ours.line()}", flush=True)
                rounds["raw"].append(raw)
                rounds["edgefleet"].append(ours)
        finally:
            logging.getLogger("controller.mqtt").setLevel(logging.ERROR)  # our own goodbye
            if serving is not None:
                thread, stop = serving
                stop.set()
                thread.join(timeout=30)
            if fleet is not None:
                fleet.stop()
            broker.stop(timeout=30)
    return report(rounds, args.target)


def report(rounds: dict[str, list[Round]], target: float) -> int:
    raw_s = statistics.median(r.seconds for r in rounds["raw"])
    ours_s = statistics.median(r.seconds for r in rounds["edgefleet"])
    devices_s = statistics.median(r.devices_s for r in rounds["edgefleet"])
    failures = sum(len(r.failures) for kind in rounds.values() for r in kind)
    for kind, results in rounds.items():
        cpu = ", ".join(f"{name} {statistics.median(r.cpu[name] for r in results):.2f}"
                        for name in results[0].cpu)
        print(f"median cpu s, {kind}: {cpu}")
    ratio = ours_s / raw_s
    passed = ratio <= target and failures == 0
    print(f"median: raw fan-out {raw_s:.2f} s; edgefleet {ours_s:.2f} s until the controller "
          f"stored every SUCCEEDED ({devices_s:.2f} s until the last device finished)")
    print(f"ratio {ratio:.2f}x raw (devices only: {devices_s / raw_s:.2f}x); target <= "
          f"{target:g}x: {'PASS' if passed else 'MISS'}"
          + (f" ({failures} failures)" if failures else ""))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
