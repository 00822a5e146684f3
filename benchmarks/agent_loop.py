"""What the agent costs on top of the model it runs, as ratios measured in this one run.

    python benchmarks/agent_loop.py [--seconds 5] [--rounds 3]

(a) Throughput of the agent's InferenceLoop with its telemetry on (every inference recorded in a
    TelemetryWindow, a window closed every 0.5 s into a real Outbox with a ResourceSampler
    reading), against a bare loop calling the same LoadedModel.predict on the same ReplaySource
    batches: digits.fp32.onnx, batch 1, one onnxruntime thread. Runs alternate A/B/A/B for the
    same duration each and the medians are compared, which keeps a 2-core machine's drift out
    of the ratio. Target: at least 0.95x (wall clock). Also printed: the same ratio per CPU
    second of the whole process (telemetry thread included), which other processes on the
    machine disturb less.
(b) Idle RSS of `python -m agent.cli run` (connected to a real Mosquitto, no model installed)
    against a bare Python process that imports the same runtimes and sleeps. Target: at most
    15 MB more.

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.inputs import ReplaySource  # noqa: E402
from agent.loop import InferenceLoop  # noqa: E402
from agent.outbox import Outbox  # noqa: E402
from agent.telemetry import ResourceSampler, TelemetryWindow  # noqa: E402
from edgefleet.contract import (  # noqa: E402
    ActiveModel,
    Channel,
    Runtime,
    RuntimeRequirement,
    TopicSchema,
    VariantKind,
    encode,
)
from edgefleet.inference import LoadedModel, load_model  # noqa: E402
from tests.broker import MosquittoBroker  # noqa: E402

MODEL = ROOT / "artifacts/digits/digits.fp32.onnx"
DATA = ROOT / "artifacts/digits/digits.data.npz"
DEVICE = "bench-0001"
ACTIVE = ActiveModel(model_name="digits", model_version=1, variant_kind=VariantKind.ONNX_FP32,
                     artifact_id="digits-v1-bench")
WINDOW_S = 0.5
THROUGHPUT_TARGET = 0.95
RSS_TARGET_MB = 15.0

# What the bare process imports: the agent's runtimes and libraries, nothing of the agent.
BARE_IMPORTS = """
import numpy, onnxruntime, ai_edge_litert.interpreter, paho.mqtt.client, msgspec, cryptography
import cryptography.hazmat.primitives.asymmetric.ed25519
import sys, time
print("ready", flush=True)
time.sleep(3600)
"""


# --- (a) throughput ------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    inferences: int
    wall_s: float
    cpu_s: float                   # of the whole process, every thread

    @property
    def per_s(self) -> float:
        return self.inferences / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        return self.inferences / self.cpu_s


def bare_run(model: LoadedModel, seconds: float) -> Run:
    """predict alone on the replay batches."""
    source = ReplaySource(DATA, batch_size=1)
    done = 0
    cpu = time.process_time()
    start = time.perf_counter()
    end = start + seconds
    while (now := time.perf_counter()) < end:
        batch = source.next_batch()
        model.predict(batch.x)
        done += len(batch.x)
    return Run(done, now - start, time.process_time() - cpu)


def agent_run(model: LoadedModel, seconds: float, state: Path) -> tuple[Run, int]:
    """The agent's loop with telemetry on; and the number of windows stored."""
    source = ReplaySource(DATA, batch_size=1)
    window = TelemetryWindow(time.time())
    loop = InferenceLoop(source, window)
    loop.swap(model, ACTIVE)                       # applies at once: the thread is not running
    sampler = ResourceSampler()
    topic = TopicSchema("edgefleet").build(Channel.TELEMETRY, DEVICE)
    outbox = Outbox(state / f"outbox-{time.monotonic_ns()}.db")
    windows = 0

    def close_window() -> None:
        nonlocal windows
        resources = sampler.sample()
        outbox.append_with_sequence(topic, lambda seq: encode(window.close(
            time.time(), device_id=DEVICE, seq=seq, model=loop.active,
            execution=loop.execution, resources=resources,
            dropped_windows=outbox.dropped("telemetry"))), kind="telemetry")
        windows += 1

    try:
        cpu = time.process_time()
        start = time.perf_counter()
        loop.start()
        next_close = start + WINDOW_S
        end = start + seconds
        while (now := time.perf_counter()) < end:
            time.sleep(max(0.0, min(next_close, end) - now))
            if time.perf_counter() >= next_close:
                close_window()
                next_close += WINDOW_S
        done = loop.health.inferences
        elapsed = time.perf_counter() - start
        cpu_s = time.process_time() - cpu
        loop.stop()
        loop.join(timeout=10)
        close_window()
    finally:
        outbox.close()
    return Run(done, elapsed, cpu_s), windows


def throughput(seconds: float, rounds: int) -> tuple[list[Run], list[Run]]:
    model = load_model(MODEL, RuntimeRequirement(runtime=Runtime.ONNXRUNTIME), threads=1)
    bare_run(model, 1.0)                           # warm up caches and the session
    agent: list[Run] = []
    bare: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(rounds):
            run, windows = agent_run(model, seconds, Path(tmp))
            agent.append(run)
            bare.append(bare_run(model, seconds))
            print(f"  round {n + 1}: agent loop {agent[-1].per_s:6.0f}/s "
                  f"({agent[-1].per_cpu_s:6.0f}/CPU-s, {windows} windows), bare loop "
                  f"{bare[-1].per_s:6.0f}/s ({bare[-1].per_cpu_s:6.0f}/CPU-s)", flush=True)
    return agent, bare


def median_ratio(agent: list[Run], bare: list[Run], rate: Callable[[Run], float]) -> float:
    return statistics.median(map(rate, agent)) / statistics.median(map(rate, bare))


# --- (b) idle RSS ---------------------------------------------------------------------------

def settled_rss_mb(process: psutil.Process, *, ready: Callable[[], bool], timeout: float = 60.0,
                   still_s: float = 3.0, tolerance_mb: float = 0.25) -> float:
    """RSS once `ready()` holds and RSS has moved by at most `tolerance_mb` for `still_s`."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError("the process never became ready")
        time.sleep(0.1)
    readings: list[tuple[float, float]] = []
    while time.monotonic() < deadline:
        now = time.monotonic()
        readings.append((now, process.memory_info().rss / 2**20))
        recent = [mb for t, mb in readings if t >= now - still_s]
        if readings[0][0] <= now - still_s and max(recent) - min(recent) <= tolerance_mb:
            return statistics.median(recent)
        time.sleep(0.1)
    raise RuntimeError(f"RSS did not settle within {timeout}s: {readings[-5:]}")


def agent_config(path: Path, port: int, state: Path) -> Path:
    path.write_text(f"""
device_id = "{DEVICE}"
state_dir = "{state}"

[broker]
host = "127.0.0.1"
port = {port}
topic_root = "bench/edgefleet"

[trust]
keys_dir = "{state / 'keys'}"

[inference]
source = "replay"
replay_file = "{DATA}"

[telemetry]
interval_s = 1.0
heartbeat_interval_s = 1.0
""")
    return path


def idle_rss() -> tuple[float, float]:
    """(agent, bare) settled RSS in MB."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "state" / "keys").mkdir(parents=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with MosquittoBroker(tmp / "mosquitto") as broker:
            log = (tmp / "agent.log").open("wb")
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config",
                 str(agent_config(tmp / "agent.toml", broker.port, tmp / "state"))],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                def agent_ready() -> bool:
                    if agent.poll() is not None:
                        raise RuntimeError(f"the agent exited with {agent.returncode}:\n"
                                           + (tmp / "agent.log").read_text()[-3000:])
                    # Mosquitto logs the client id of each connection it accepts.
                    return f" as {DEVICE} " in broker.log_text()

                agent_mb = settled_rss_mb(psutil.Process(agent.pid), ready=agent_ready)
            finally:
                agent.terminate()
                agent.wait(timeout=30)
                log.close()
        bare = subprocess.Popen([sys.executable, "-c", BARE_IMPORTS], stdout=subprocess.PIPE,
                                env=env)
        try:
            assert bare.stdout is not None
            line = bare.stdout.readline()
            bare_mb = settled_rss_mb(psutil.Process(bare.pid), ready=lambda: line == b"ready\n")
        finally:
            bare.terminate()
            bare.wait(timeout=30)
    return agent_mb, bare_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs")
    args = parser.parse_args()

    print(f"(a) throughput: digits.fp32.onnx, batch 1, 1 thread, {args.rounds} x "
          f"{args.seconds:g} s each way, on {os.cpu_count()} CPUs", flush=True)
    agent, bare = throughput(args.seconds, args.rounds)
    ratio = median_ratio(agent, bare, lambda r: r.per_s)
    cpu_ratio = median_ratio(agent, bare, lambda r: r.per_cpu_s)
    print(f"  median: agent loop {statistics.median(r.per_s for r in agent):.0f}/s, bare "
          f"{statistics.median(r.per_s for r in bare):.0f}/s; ratio {ratio:.3f}x "
          f"(per CPU second: {cpu_ratio:.3f}x)", flush=True)
    load = os.getloadavg()[0]
    print(f"  load average while measuring: {load:.2f} on {os.cpu_count()} CPUs", flush=True)

    print("(b) idle RSS: agent (connected, no model) vs a bare process with the same imports",
          flush=True)
    agent_mb, bare_mb = idle_rss()
    extra_mb = agent_mb - bare_mb
    print(f"  agent {agent_mb:.1f} MB, bare {bare_mb:.1f} MB", flush=True)

    checks = [
        (f"throughput with telemetry >= {THROUGHPUT_TARGET}x bare", ratio >= THROUGHPUT_TARGET,
         f"{ratio:.3f}x"),
        (f"idle RSS <= bare + {RSS_TARGET_MB:g} MB", extra_mb <= RSS_TARGET_MB,
         f"{extra_mb:+.1f} MB"),
    ]
    print()
    for name, ok, value in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name:<42} {value}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
