"""The telemetry gates: each passes, fails and waits for samples, with the numbers behind it."""

from __future__ import annotations

import pytest

from controller.rollout.gates import (
    ACCURACY_DROP,
    ACCURACY_FLOOR,
    ERROR_RATE,
    LATENCY,
    GroupMetrics,
    Verdict,
    accuracy_drop_gate,
    accuracy_floor_gate,
    collect,
    error_rate_gate,
    evaluate,
    latency_gate,
    overall,
)
from controller.rollout.model import (
    DeploymentState,
    DeviceDeployment,
    DeviceMetrics,
    GateInputs,
    Gates,
)


def updated(device_id: str, variant: str | None = "int8",
            state: DeploymentState = DeploymentState.SUCCEEDED) -> DeviceDeployment:
    return DeviceDeployment(device_id=device_id, variant_id=variant, state=state, attempts=1)


def inputs(*, before_p95: float | None = 10.0, after_p95: float | None = 11.0,
           inferences: int = 1000, errors: int = 0, labelled: int = 100,
           correct: int = 95) -> GateInputs:
    return GateInputs(
        before=DeviceMetrics(inferences=5000, errors=1, p95_ms=before_p95, labelled=100,
                             correct=97),
        after=DeviceMetrics(inferences=inferences, errors=errors, p95_ms=after_p95,
                            labelled=labelled, correct=correct))


# --- collect -----------------------------------------------------------------------------------

def test_collect_sums_only_updated_devices_that_reported() -> None:
    devices = [updated("a"), updated("b"), updated("c", state=DeploymentState.IN_PROGRESS),
               updated("d"), updated("e")]
    telemetry = {"a": inputs(), "b": inputs(errors=4, correct=90), "c": inputs(),
                 "e": GateInputs(before=DeviceMetrics(inferences=10), after=None)}

    m = collect(devices, telemetry, {"int8": 0.97})

    assert m.devices == 2                      # c is still installing, d and e have no numbers
    assert (m.inferences, m.errors) == (2000, 4)
    assert (m.labelled, m.correct) == (200, 185)
    assert (m.latency_devices, m.latency_samples) == (2, 2000)
    assert (m.p95_before_sum_ms, m.p95_after_sum_ms) == (20.0, 22.0)
    assert (m.expected_labelled, m.expected_actual) == (200, 185)
    assert m.expected_correct == pytest.approx(194.0)


def test_collect_compares_latency_only_on_devices_with_both_models_measured() -> None:
    devices = [updated("a"), updated("b"), updated("c")]
    telemetry = {"a": inputs(before_p95=10.0, after_p95=12.0),
                 "b": inputs(before_p95=None, after_p95=50.0),
                 "c": GateInputs(before=None, after=DeviceMetrics(inferences=10, p95_ms=90.0))}

    m = collect(devices, telemetry, {})

    assert (m.latency_devices, m.latency_samples) == (1, 1000)
    assert latency_gate(m, 1.5, 1).measured == pytest.approx(1.2)


def test_collect_weights_build_accuracy_by_each_variants_labelled_inferences() -> None:
    devices = [updated("a", "int8"), updated("b", "fp16"), updated("c", "unknown-variant")]
    telemetry = {"a": inputs(labelled=300, correct=270), "b": inputs(labelled=100, correct=99),
                 "c": inputs(labelled=1000, correct=0)}

    m = collect(devices, telemetry, {"int8": 0.90, "fp16": 1.00})

    # c's variant has no build-time accuracy: it counts for the floor, not for the drop.
    assert (m.labelled, m.correct) == (1400, 369)
    assert (m.expected_labelled, m.expected_actual) == (400, 369)
    assert m.expected_correct == pytest.approx(300 * 0.90 + 100 * 1.00)


# --- each gate: passes, fails, waits ----------------------------------------------------------

def metrics(**sums: float) -> GroupMetrics:
    return GroupMetrics(**sums)  # type: ignore[arg-type]


@pytest.mark.parametrize(("after_sum", "samples", "verdict"), [
    (22.0, 1000, Verdict.PASSED),      # 1.10 <= 1.2
    (24.0, 1000, Verdict.PASSED),      # exactly at the limit passes
    (26.0, 1000, Verdict.FAILED),      # 1.30 > 1.2
    (26.0, 999, Verdict.WAITING),      # too few samples: waits, even though it looks bad
])
def test_latency_gate(after_sum: float, samples: int, verdict: Verdict) -> None:
    m = metrics(latency_devices=2, latency_samples=samples, p95_before_sum_ms=20.0,
                p95_after_sum_ms=after_sum)

    result = latency_gate(m, max_ratio=1.2, min_samples=1000)

    assert result.name == LATENCY
    assert result.verdict is verdict
    assert result.measured == pytest.approx(after_sum / 20.0)
    assert (result.threshold, result.samples, result.min_samples) == (1.2, samples, 1000)
    assert "10.00 ms ->" in result.detail


def test_latency_gate_waits_when_no_device_measured_both_models() -> None:
    result = latency_gate(metrics(), max_ratio=1.2, min_samples=1)

    assert result.verdict is Verdict.WAITING
    assert result.measured is None and result.samples == 0
    assert "no device reported p95" in result.detail


@pytest.mark.parametrize(("correct", "labelled", "verdict"), [
    (950, 1000, Verdict.PASSED),
    (900, 1000, Verdict.PASSED),       # at the floor passes
    (899, 1000, Verdict.FAILED),
    (10, 99, Verdict.WAITING),
    (0, 0, Verdict.WAITING),
])
def test_accuracy_floor_gate(correct: int, labelled: int, verdict: Verdict) -> None:
    result = accuracy_floor_gate(metrics(labelled=labelled, correct=correct), floor=0.9,
                                 min_samples=100)

    assert result.name == ACCURACY_FLOOR
    assert result.verdict is verdict
    assert result.measured == (pytest.approx(correct / labelled) if labelled else None)
    assert (result.threshold, result.samples, result.min_samples) == (0.9, labelled, 100)


@pytest.mark.parametrize(("actual", "labelled", "verdict", "drop"), [
    (975, 1000, Verdict.PASSED, 0.5),  # built 98.0%, live 97.5%: 0.5 points
    (960, 1000, Verdict.PASSED, 2.0),  # at the limit passes
    (950, 1000, Verdict.FAILED, 3.0),
    (1000, 1000, Verdict.PASSED, -2.0),  # better than at build time
    (40, 50, Verdict.WAITING, 18.0),
])
def test_accuracy_drop_gate(actual: int, labelled: int, verdict: Verdict, drop: float) -> None:
    m = metrics(labelled=labelled, correct=actual, expected_labelled=labelled,
                expected_actual=actual, expected_correct=0.98 * labelled)

    result = accuracy_drop_gate(m, max_drop_points=2.0, min_samples=100)

    assert result.name == ACCURACY_DROP
    assert result.verdict is verdict
    assert result.measured == pytest.approx(drop)
    assert (result.threshold, result.samples, result.min_samples) == (2.0, labelled, 100)
    assert "build-time 0.9800" in result.detail


def test_accuracy_drop_gate_waits_without_a_build_time_accuracy() -> None:
    result = accuracy_drop_gate(metrics(labelled=5000, correct=4000), max_drop_points=2.0,
                                min_samples=100)

    assert result.verdict is Verdict.WAITING
    assert result.measured is None
    assert "5000 labelled in all" in result.detail


@pytest.mark.parametrize(("errors", "inferences", "verdict"), [
    (5, 1000, Verdict.PASSED),
    (10, 1000, Verdict.PASSED),        # at the limit passes
    (11, 1000, Verdict.FAILED),
    (50, 999, Verdict.WAITING),
    (0, 0, Verdict.WAITING),
])
def test_error_rate_gate(errors: int, inferences: int, verdict: Verdict) -> None:
    m = metrics(devices=3, inferences=inferences, errors=errors)

    result = error_rate_gate(m, max_rate=0.01, min_samples=1000)

    assert result.name == ERROR_RATE
    assert result.verdict is verdict
    assert result.measured == (pytest.approx(errors / inferences) if inferences else None)
    assert (result.threshold, result.samples, result.min_samples) == (0.01, inferences, 1000)
    assert f"{errors} errors in {inferences} inferences on 3 devices" in result.detail


# --- all gates together ------------------------------------------------------------------------

def test_evaluate_checks_only_the_configured_gates_in_a_fixed_order() -> None:
    m = metrics(inferences=1000, errors=1, labelled=1000, correct=990)

    assert evaluate(m, Gates()) == ()
    names = [r.name for r in evaluate(m, Gates(max_error_rate=0.01, min_accuracy=0.9,
                                               max_latency_ratio=1.5))]
    assert names == [LATENCY, ACCURACY_FLOOR, ERROR_RATE]


def test_overall_verdict_failed_beats_waiting_beats_passed() -> None:
    m = metrics(inferences=1000, errors=500, labelled=10, correct=10)
    fail = error_rate_gate(m, 0.01, 1)
    wait = accuracy_floor_gate(m, 0.9, 100)
    ok = accuracy_floor_gate(m, 0.9, 1)

    assert overall([ok, wait, fail]) is Verdict.FAILED
    assert overall([ok, wait]) is Verdict.WAITING
    assert overall([ok]) is Verdict.PASSED
    assert overall([]) is Verdict.PASSED


@pytest.mark.parametrize(("field", "value"), [
    ("max_latency_ratio", 0.0), ("max_latency_ratio", float("nan")),
    ("min_accuracy", 1.5), ("min_accuracy", -0.1),
    ("max_accuracy_drop_points", 101.0), ("max_error_rate", 2.0),
    ("latency_min_samples", 0), ("accuracy_min_samples", -1), ("error_min_samples", 0),
    ("timeout_s", 0.0), ("timeout_s", float("inf")),
])
def test_bad_gate_settings_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"gates.{field}"):
        Gates(**{field: value})  # type: ignore[arg-type]
