"""Telemetry windows against numpy on known inputs, the reservoir's fixed memory, and resource
sampling from fake roots' thermal zones and the real process."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.telemetry import Resources, ResourceSampler, TelemetryWindow, read_temperature_c
from edgefleet.contract import ActiveModel, LatencyStats, TelemetryBatch, VariantKind

FAKEROOTS = Path(__file__).parent / "fakeroots"
MODEL = ActiveModel(model_name="digits", model_version=3, variant_kind=VariantKind.TFLITE_INT8,
                    artifact_id="a1")
RESOURCES = Resources(cpu_percent=12.5, rss_mb=80.0, temperature_c=48.312)


def close(window: TelemetryWindow, now: float, resources: Resources | None = RESOURCES,
          seq: int = 7) -> TelemetryBatch:
    return window.close(now, device_id="pi-0001", seq=seq, model=MODEL,
                        execution="litert/edgetpu", resources=resources, dropped_windows=2)


def test_a_window_reports_counts_percentiles_and_label_rates_as_numpy_computes_them() -> None:
    latencies = [5.0, 7.5, 6.0, 30.0, 5.5, 8.0, 6.5, 12.0]
    correct = [True, True, False, True, None, True, None, False]
    agreed = [True, None, True, True, False, None, None, True]
    window = TelemetryWindow(start=100.0)
    for latency, is_correct, did_agree in zip(latencies, correct, agreed, strict=True):
        window.record(latency, correct=is_correct, agreed=did_agree)

    batch = close(window, 110.0)

    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    assert batch.latency == LatencyStats(p50_ms=p50, p95_ms=p95, p99_ms=p99, max_ms=30.0)
    assert (batch.inferences, batch.errors, batch.labelled) == (8, 0, 6)
    assert batch.accuracy == pytest.approx(4 / 6)
    assert batch.agreement == pytest.approx(4 / 5)
    assert (batch.window_start, batch.window_end, batch.seq) == (100.0, 110.0, 7)
    assert (batch.device_id, batch.model, batch.execution) == ("pi-0001", MODEL, "litert/edgetpu")
    assert (batch.cpu_percent, batch.rss_mb, batch.temperature_c) == (12.5, 80.0, 48.312)
    assert batch.dropped_windows == 2


def test_throughput_is_inferences_over_the_window_duration() -> None:
    window = TelemetryWindow(start=0.0)
    for _ in range(25):
        window.record(1.0, correct=None, agreed=None)

    assert close(window, 10.0).throughput_ips == pytest.approx(2.5)
    assert close(window, 10.0).throughput_ips == 0.0        # a zero-length window: no division


def test_without_labels_or_inferences_the_optional_fields_are_none() -> None:
    window = TelemetryWindow(start=0.0)
    empty = close(window, 10.0, resources=None)
    assert empty.latency is None and empty.accuracy is None and empty.agreement is None
    assert (empty.inferences, empty.throughput_ips, empty.labelled) == (0, 0.0, 0)
    assert empty.cpu_percent is None and empty.temperature_c is None

    window.record(4.0, correct=None, agreed=None)
    unlabelled = close(window, 20.0)
    assert unlabelled.latency is not None
    assert unlabelled.accuracy is None and unlabelled.agreement is None


def test_errors_count_as_inferences_but_stay_out_of_the_latencies() -> None:
    window = TelemetryWindow(start=0.0)
    window.record(10.0, correct=True, agreed=None)
    window.record(0.1, correct=None, agreed=None, error=True)

    batch = close(window, 1.0)

    assert (batch.inferences, batch.errors) == (2, 1)
    assert batch.latency is not None and batch.latency.p50_ms == 10.0
    assert batch.latency.max_ms == 10.0


def test_closing_starts_the_next_window_empty_at_the_close_time() -> None:
    window = TelemetryWindow(start=0.0)
    window.record(3.0, correct=True, agreed=True)
    close(window, 10.0)
    window.record(9.0, correct=False, agreed=None)

    batch = close(window, 15.0)

    assert (batch.window_start, batch.window_end, batch.inferences) == (10.0, 15.0, 1)
    assert batch.accuracy == 0.0 and batch.agreement is None
    assert batch.latency is not None and batch.latency.p50_ms == 9.0


def test_the_reservoir_keeps_memory_fixed_while_counts_and_max_stay_exact() -> None:
    window = TelemetryWindow(start=0.0, max_samples=1000)
    buffer = window._samples                              # the one allocation, reused
    rng = np.random.default_rng(1)
    latencies = rng.gamma(shape=4.0, scale=2.5, size=50_000)
    for i, latency in enumerate(latencies):
        window.record(float(latency), correct=True if i % 4 == 0 else None, agreed=None)

    assert window._samples is buffer and buffer.size == 1000
    batch = close(window, 10.0)

    assert batch.inferences == 50_000 and batch.labelled == 12_500
    assert batch.accuracy == 1.0
    assert batch.latency is not None
    assert batch.latency.max_ms == latencies.max()
    exact_p50, exact_p95 = np.percentile(latencies, [50, 95])
    assert batch.latency.p50_ms == pytest.approx(exact_p50, rel=0.05)   # a sample, not exact
    assert batch.latency.p95_ms == pytest.approx(exact_p95, rel=0.10)


def test_the_same_inputs_give_the_same_sampled_percentiles() -> None:
    def run() -> object:
        window = TelemetryWindow(start=0.0, max_samples=10)
        for i in range(1000):
            window.record(float(i % 97), correct=None, agreed=None)
        return close(window, 1.0).latency

    assert run() == run()


def test_record_and_close_from_two_threads_lose_no_inference() -> None:
    window = TelemetryWindow(start=0.0, max_samples=100)
    total = 20_000
    counted: list[int] = []
    done = threading.Event()

    def inference_thread() -> None:
        for _ in range(total):
            window.record(1.0, correct=None, agreed=None)
        done.set()

    thread = threading.Thread(target=inference_thread)
    thread.start()
    now = 0.0
    while not done.is_set():
        now += 1.0
        counted.append(close(window, now).inferences)
    thread.join()
    counted.append(close(window, now + 1.0).inferences)

    assert sum(counted) == total


def test_max_samples_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TelemetryWindow(start=0.0, max_samples=0)


# --- resources ---------------------------------------------------------------------------------

def test_temperature_is_read_from_a_fake_roots_thermal_zone_in_degrees() -> None:
    assert read_temperature_c(FAKEROOTS / "rpi4") == pytest.approx(48.312)


def test_temperature_is_the_hottest_zone_ignoring_the_jetson_pmic_placeholder() -> None:
    # jetson-nano: AO 39.5, CPU 41.5, GPU 40.0, PLL 38.75, and PMIC-Die's constant 100.0
    assert read_temperature_c(FAKEROOTS / "jetson-nano") == pytest.approx(41.5)


def test_temperature_is_none_without_thermal_zones_or_with_unreadable_ones(
        tmp_path: Path) -> None:
    assert read_temperature_c(FAKEROOTS / "x86-64") is None
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("not a number\n")
    assert read_temperature_c(tmp_path) is None
    hot = tmp_path / "sys/class/thermal/thermal_zone1"
    hot.mkdir()
    (hot / "temp").write_text("-5000\n")                   # below zero is still a reading
    assert read_temperature_c(tmp_path) == -5.0


def test_resource_sampler_reads_this_process_and_the_roots_temperature() -> None:
    sampler = ResourceSampler(root=FAKEROOTS / "rpi4")
    sum(i * i for i in range(200_000))                      # some CPU between the two calls

    resources = sampler.sample()

    assert resources.rss_mb is not None and 1.0 < resources.rss_mb < 100_000
    assert resources.cpu_percent is not None and resources.cpu_percent >= 0.0
    assert resources.temperature_c == pytest.approx(48.312)
