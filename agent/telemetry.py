"""Telemetry windows: what the models did over the last interval, and what the device felt.

`TelemetryWindow` is the accumulator the inference loop records into and the telemetry loop
closes into a `TelemetryBatch`; it holds no clock and does no I/O, so the caller passes the
times. `ResourceSampler` is the edge that reads the process and the thermal zones.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from edgefleet.contract import ActiveModel, LatencyStats, TelemetryBatch

DEFAULT_MAX_SAMPLES = 10_000


@dataclass(frozen=True)
class Resources:
    cpu_percent: float | None          # psutil's convention: 100 is one core busy
    rss_mb: float | None
    temperature_c: float | None


@dataclass
class _Tally:
    """One window's exact counts; latencies beyond the reservoir are sampled, not kept."""

    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    compared: int = 0                  # inferences that had a reference output to agree with
    agreed: int = 0
    timed: int = 0                     # latencies offered to the reservoir
    max_ms: float = 0.0


class TelemetryWindow:
    """Thread-safe: the inference thread calls `record`, the telemetry thread `close`.

    Memory stays fixed however fast inference runs: at most `max_samples` latencies per window
    are kept, chosen by reservoir sampling (algorithm R) with a fixed seed, so percentiles are
    exact up to that many inferences and an unbiased estimate beyond; counts and the maximum are
    always exact.
    """

    def __init__(self, start: float, *, max_samples: int = DEFAULT_MAX_SAMPLES,
                 seed: int = 0) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._rng = np.random.default_rng(seed)
        self._samples = np.empty(max_samples, dtype=np.float64)
        self._start = start
        self._tally = _Tally()

    @property
    def start(self) -> float:
        return self._start

    @property
    def max_samples(self) -> int:
        return len(self._samples)

    def record(self, latency_ms: float, *, correct: bool | None, agreed: bool | None,
               error: bool = False) -> None:
        """One inference. A failed one counts but its latency does not: a fast failure would
        make the percentiles look better than the model is."""
        with self._lock:
            tally = self._tally
            tally.inferences += 1
            if correct is not None:
                tally.labelled += 1
                tally.correct += correct
            if agreed is not None:
                tally.compared += 1
                tally.agreed += agreed
            if error:
                tally.errors += 1
                return
            tally.max_ms = max(tally.max_ms, latency_ms)
            slot = tally.timed if tally.timed < len(self._samples) else (
                self._random.randrange(tally.timed + 1))
            if slot < len(self._samples):
                self._samples[slot] = latency_ms
            tally.timed += 1

    def record_many(self, latencies_ms: np.ndarray, *, errors: int, labelled: int,
                    correct: int, compared: int = 0, agreed: int = 0) -> None:
        """Many inferences at once: `latencies_ms` of the successful ones, counts of the rest.
        The inference loop calls this every few dozen batches instead of `record` per sample,
        so the bookkeeping costs one lock and a few array operations per flush."""
        with self._lock:
            tally = self._tally
            tally.inferences += len(latencies_ms) + errors
            tally.errors += errors
            tally.labelled += labelled
            tally.correct += correct
            tally.compared += compared
            tally.agreed += agreed
            if not len(latencies_ms):
                return
            tally.max_ms = max(tally.max_ms, float(latencies_ms.max()))
            free = max(0, len(self._samples) - tally.timed)
            direct = latencies_ms[:free]
            self._samples[tally.timed:tally.timed + len(direct)] = direct
            tally.timed += len(direct)
            rest = latencies_ms[free:]
            if len(rest):
                # Reservoir sampling as in `record`, vectorised: the i-th of them replaces a
                # random slot of [0, timed + i] when that slot is inside the reservoir. (A loop
                # here cost ~0.4 us a sample, a tenth of a small model's inference.)
                slots = self._rng.integers(0, tally.timed + np.arange(1, len(rest) + 1))
                keep = slots < len(self._samples)
                self._samples[slots[keep]] = rest[keep]
                tally.timed += len(rest)

    def close(self, now: float, *, device_id: str, seq: int, model: ActiveModel | None,
              execution: str, resources: Resources | None,
              dropped_windows: int) -> TelemetryBatch:
        """The batch for the window [start, now); the next window starts at `now`."""
        with self._lock:
            tally, start = self._tally, self._start
            kept = self._samples[:min(tally.timed, len(self._samples))].copy()
            self._tally, self._start = _Tally(), now
        duration = now - start
        return TelemetryBatch(
            device_id=device_id,
            seq=seq,
            window_start=start,
            window_end=now,
            model=model,
            execution=execution,
            inferences=tally.inferences,
            errors=tally.errors,
            throughput_ips=tally.inferences / duration if duration > 0 else 0.0,
            latency=_latency_stats(kept, tally.max_ms),
            labelled=tally.labelled,
            accuracy=tally.correct / tally.labelled if tally.labelled else None,
            agreement=tally.agreed / tally.compared if tally.compared else None,
            cpu_percent=resources.cpu_percent if resources else None,
            rss_mb=resources.rss_mb if resources else None,
            temperature_c=resources.temperature_c if resources else None,
            dropped_windows=dropped_windows,
        )


def _latency_stats(samples: np.ndarray, max_ms: float) -> LatencyStats | None:
    if samples.size == 0:
        return None
    p50, p95, p99 = np.percentile(samples, [50, 95, 99])
    return LatencyStats(p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99),
                        max_ms=float(max_ms))


# Thermal zones that report a constant, not a temperature: the Jetson Nano's PMIC-Die reads
# 100 C always (tegrastats shows "PMIC@100C"), which would hide every real reading under max().
_PLACEHOLDER_ZONES = frozenset({"PMIC-Die"})


class ResourceSampler:
    """Reads this process's CPU and memory and the hottest thermal zone under `root`."""

    def __init__(self, root: Path = Path("/"), process: psutil.Process | None = None) -> None:
        self.root = root
        self._process = process or psutil.Process()
        # psutil measures CPU between two calls; the first one only starts the clock.
        self._process.cpu_percent(interval=None)

    def sample(self) -> Resources:
        return Resources(
            cpu_percent=float(self._process.cpu_percent(interval=None)),
            rss_mb=self._process.memory_info().rss / 2**20,
            temperature_c=read_temperature_c(self.root),
        )


def read_temperature_c(root: Path) -> float | None:
    """The highest reading of ``{root}/sys/class/thermal/thermal_zone*/temp`` (millidegrees),
    or None when no zone gives one."""
    readings = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        if _read_line(zone / "type") in _PLACEHOLDER_ZONES:
            continue
        text = _read_line(zone / "temp")
        try:
            readings.append(int(text or "") / 1000.0)
        except ValueError:
            continue                    # a zone whose sensor is off fails to read, or reads junk
    return max(readings) if readings else None


def _read_line(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
