"""Times one rollout engine step on a 100,000-device rollout and checks it against the target.

    python benchmarks/engine.py [--runs N]

The snapshot has four groups (1k canary, 9k early, 40k wide, 50k rest) with realistic mixes:
the first two succeeded with stragglers still in flight (some past the in-progress timeout,
some waiting for a retry), the third has soaked and carries new/old telemetry for its 38k
updated devices, the fourth is pending. The timed Tick ends attempts that ran out of time,
checks the abort criteria and the error and success thresholds, evaluates every gate over the
soaked group, starts the last group and fills the rate limit. Target (issue): median <= 50 ms.
Exits 1 on a miss. A DeviceStatus step is timed too, for information.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msgspec.structs import replace  # noqa: E402

from controller.rollout.engine import step  # noqa: E402
from controller.rollout.events import DeployTo, DeviceStatus, Tick  # noqa: E402
from controller.rollout.model import (  # noqa: E402
    DeploymentState,
    DeviceDeployment,
    DeviceMetrics,
    DeviceTarget,
    GateInputs,
    Gates,
    GroupState,
    RolloutConfig,
    RolloutSnapshot,
    RolloutState,
    command_id_for,
    new_rollout,
)
from edgefleet.contract import CommandState  # noqa: E402

TARGET_MS = 50.0
NOW = 1_900_000_000.0
ROLLOUT = "r-2024-digits-v7"
VARIANTS = {"digits-v7-tflite-int8": 0.981, "digits-v7-onnx-int8": 0.984,
            "digits-v7-onnx-fp16": 0.987}
GROUPS = (("canary", 1_000), ("early", 9_000), ("wide", 40_000), ("rest", 50_000))
CONFIG = RolloutConfig(
    success_threshold_percent=95, error_threshold_percent=5, max_retries=2,
    in_progress_timeout_s=900, max_starts_per_minute=1_000, abort_failure_percent=20,
    abort_min_devices=100, soak_s=1_800,
    gates=Gates(max_latency_ratio=1.2, min_accuracy=0.9, max_accuracy_drop_points=2.0,
                max_error_rate=0.01, latency_min_samples=1_000, accuracy_min_samples=1_000,
                error_min_samples=1_000))


def _device(d: DeviceDeployment, i: int, g: int) -> DeviceDeployment:
    """A realistic state for device i of a started group."""
    if d.state is DeploymentState.SKIPPED:
        return d
    bucket = i % 200
    attempt = 1 + (i % 3 == 0)
    command_id = command_id_for(ROLLOUT, d.device_id, "deploy", attempt)
    started = NOW - 3_600 - (i % 1_000)
    if bucket < 2:            # 1%: failed for good
        return replace(d, state=DeploymentState.FAILED, attempts=3, command_id=command_id,
                       started_at=started, finished_at=started + 60, reason="smoke test")
    if bucket < 3:            # 0.5%: timed out for good
        return replace(d, state=DeploymentState.TIMED_OUT, attempts=3, command_id=command_id,
                       started_at=started, finished_at=started + 900)
    if bucket < 5:            # 1%: still in flight, half of them past the timeout
        late = bucket == 3
        return replace(d, state=DeploymentState.IN_PROGRESS, attempts=attempt,
                       command_id=command_id, started_at=NOW - (1_000 if late else 120))
    if bucket < 6 and g < 2:  # 0.5%: waiting for a retry
        return replace(d, state=DeploymentState.PENDING, attempts=1, command_id=command_id,
                       started_at=started, reason="attempt 1 failed")
    return replace(d, state=DeploymentState.SUCCEEDED, attempts=attempt, command_id=command_id,
                   started_at=started, updated_at=started + 300, finished_at=started + 300)


def build() -> RolloutSnapshot:
    names = list(VARIANTS)
    groups, n = [], 0
    for name, size in GROUPS:
        targets = []
        for _ in range(size):
            variant = None if n % 97 == 0 else names[n % len(names)]
            targets.append(DeviceTarget(device_id=f"dev-{n:06d}", variant_id=variant,
                                        reason="no runtime for this hardware" if not variant
                                        else ""))
            n += 1
        groups.append((name, targets))
    snapshot = new_rollout(ROLLOUT, "digits", 7, CONFIG, groups)
    built, telemetry = [], {}
    for g, group in enumerate(snapshot.groups):
        if g == 3:
            built.append(group)
            continue
        devices = {k: _device(d, i, g) for i, (k, d) in enumerate(group.devices.items())}
        state = GroupState.SUCCEEDED if g < 2 else GroupState.SOAKING
        built.append(replace(group, devices=devices, state=state, started_at=NOW - 86_400,
                             soak_started_at=NOW - 7_200,
                             finished_at=NOW - 3_600 if g < 2 else None))
        if g == 2:
            for i, d in enumerate(devices.values()):
                if d.state is DeploymentState.SUCCEEDED:
                    p95 = 8.0 + (i % 40)
                    telemetry[d.device_id] = GateInputs(
                        before=DeviceMetrics(inferences=5_000, errors=2, p95_ms=p95,
                                             labelled=500, correct=492),
                        after=DeviceMetrics(inferences=4_000 + i % 100, errors=i % 3,
                                            p95_ms=p95 * 1.05, labelled=400,
                                            correct=392 - i % 5))
    recent = tuple(NOW - 59 + i * 0.1 for i in range(400))
    return replace(snapshot, state=RolloutState.RUNNING, groups=tuple(built),
                   started_at=NOW - 86_400, start_log=recent, telemetry=telemetry,
                   build_accuracy=VARIANTS)


def timed(snapshot: RolloutSnapshot, event: Tick | DeviceStatus,
          runs: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of `runs` steps."""
    wall, cpu = [], []
    for _ in range(runs):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        step(snapshot, event)
        cpu.append((time.process_time() - begin_cpu) * 1000)
        wall.append((time.perf_counter() - begin) * 1000)
    return wall, cpu


def calibration_ms() -> float:
    """A fixed pure-Python loop, timed beside the engine so that figures from a slow or busy
    machine can be compared with figures from another."""
    best = math.inf
    for _ in range(5):
        begin = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, (time.perf_counter() - begin) * 1000)
    return best


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    snapshot = build()
    devices = sum(len(g.devices) for g in snapshot.groups)
    result = step(snapshot, Tick(now=NOW))
    states = [g.state.value for g in result.snapshot.groups]
    deploys = sum(isinstance(a, DeployTo) for a in result.actions)
    print(f"{devices} devices, {len(snapshot.telemetry)} with gate telemetry; one Tick -> "
          f"groups {states}, {deploys} DeployTo, {len(result.actions)} actions")
    if result.snapshot.groups[2].state is not GroupState.SUCCEEDED or deploys != 600:
        print("MISS: the benchmark scenario did not exercise the gates and the rate limit")
        return 1

    no_gates = replace(snapshot, config=replace(CONFIG, gates=Gates()))
    in_flight = next(d for d in snapshot.groups[2].devices.values()
                     if d.state is DeploymentState.IN_PROGRESS)
    status = DeviceStatus(now=NOW, device_id=in_flight.device_id,
                          command_id=in_flight.command_id, state=CommandState.SUCCEEDED)
    gc.collect()
    ticks, tick_cpu = timed(snapshot, Tick(now=NOW), args.runs)
    bare, _ = timed(no_gates, Tick(now=NOW), args.runs)
    statuses, _ = timed(snapshot, status, args.runs)
    median = statistics.median(ticks)
    print(f"calibration: a 1e6-iteration Python loop took {calibration_ms():.1f} ms here")
    print(f"Tick:              median {median:6.1f} ms   p95 {p95(ticks):6.1f} ms   "
          f"CPU median {statistics.median(tick_cpu):6.1f} ms   ({args.runs} runs)")
    print(f"Tick, no gates:    median {statistics.median(bare):6.1f} ms   "
          f"p95 {p95(bare):6.1f} ms")
    print(f"DeviceStatus:      median {statistics.median(statuses):6.1f} ms   "
          f"p95 {p95(statuses):6.1f} ms")
    verdict = "PASS" if median <= TARGET_MS else "MISS"
    print(f"{verdict}: Tick median {median:.1f} ms, target <= {TARGET_MS:g} ms")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
