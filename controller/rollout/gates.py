"""Telemetry gates: does a soaked group run the new model as well as the old one ran there?

Pure functions over per-device aggregates (GateInputs). `collect` sums the updated devices of a
group once; each gate then reads the sums and returns a GateResult with the measured number, its
threshold and the samples behind it. Too few samples make a gate wait, never pass.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import msgspec

from controller.rollout.model import DeploymentState, DeviceDeployment, GateInputs, Gates


class Verdict(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    WAITING = "waiting"            # too few samples to decide yet


class GateResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    verdict: Verdict
    measured: float | None         # None while there are no samples at all
    threshold: float
    samples: int
    min_samples: int
    detail: str


class GroupMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Sums over the updated devices of one group that reported new-model telemetry."""

    devices: int = 0
    inferences: int = 0
    errors: int = 0
    # Devices with a p95 both before and after: the latency ratio compares only those.
    latency_devices: int = 0
    latency_samples: int = 0       # new-model inferences on those devices
    p95_before_sum_ms: float = 0.0
    p95_after_sum_ms: float = 0.0
    labelled: int = 0
    correct: int = 0
    # The labelled inferences of devices whose variant has a known build-time accuracy, and the
    # number of them the build-time accuracy says should have been right.
    expected_labelled: int = 0
    expected_actual: int = 0
    expected_correct: float = 0.0


LATENCY = "p95-latency-ratio"
ACCURACY_FLOOR = "accuracy-floor"
ACCURACY_DROP = "accuracy-drop"
ERROR_RATE = "error-rate"


def collect(devices: Iterable[DeviceDeployment], telemetry: Mapping[str, GateInputs],
            build_accuracy: Mapping[str, float]) -> GroupMetrics:
    """Sums the telemetry of a group's updated (SUCCEEDED) devices in one pass; the others, and
    devices without telemetry, are left out."""
    n = inferences = errors = latency_devices = latency_samples = 0
    labelled = correct = expected_labelled = expected_actual = 0
    before_sum = after_sum = expected_correct = 0.0
    built_for, inputs_for, SUCCEEDED = build_accuracy.get, telemetry.get, DeploymentState.SUCCEEDED
    for device in devices:                   # once per device per tick: locals, few lookups
        if device.state is not SUCCEEDED:
            continue
        inputs = inputs_for(device.device_id)
        if inputs is None:
            continue
        after = inputs.after
        if after is None:
            continue
        n += 1
        count = after.inferences
        inferences += count
        errors += after.errors
        after_p95 = after.p95_ms
        before = inputs.before
        if after_p95 is not None and before is not None:
            before_p95 = before.p95_ms
            if before_p95 is not None and before_p95 > 0:
                latency_devices += 1
                latency_samples += count
                before_sum += before_p95
                after_sum += after_p95
        with_label = after.labelled
        if with_label:
            right = after.correct
            labelled += with_label
            correct += right
            variant_id = device.variant_id
            built = built_for(variant_id) if variant_id is not None else None
            if built is not None:
                expected_labelled += with_label
                expected_actual += right
                expected_correct += built * with_label
    return GroupMetrics(devices=n, inferences=inferences, errors=errors,
                        latency_devices=latency_devices, latency_samples=latency_samples,
                        p95_before_sum_ms=before_sum, p95_after_sum_ms=after_sum,
                        labelled=labelled, correct=correct, expected_labelled=expected_labelled,
                        expected_actual=expected_actual, expected_correct=expected_correct)


def _result(name: str, passed: bool, measured: float | None, threshold: float, samples: int,
            min_samples: int, detail: str) -> GateResult:
    if samples < min_samples or measured is None:
        verdict = Verdict.WAITING
        detail = f"{samples} of {min_samples} samples; {detail}"
    else:
        verdict = Verdict.PASSED if passed else Verdict.FAILED
    return GateResult(name=name, verdict=verdict, measured=measured, threshold=threshold,
                      samples=samples, min_samples=min_samples, detail=detail)


def latency_gate(m: GroupMetrics, max_ratio: float, min_samples: int) -> GateResult:
    """Mean p95 of the new model over the mean p95 of the old one, on the same devices (so a
    fleet of Jetsons and Pis compares each with itself); passes when <= max_ratio."""
    if m.latency_devices == 0:
        return _result(LATENCY, False, None, max_ratio, m.latency_samples, min_samples,
                       "no device reported p95 for both models")
    before = m.p95_before_sum_ms / m.latency_devices
    after = m.p95_after_sum_ms / m.latency_devices
    ratio = after / before
    return _result(LATENCY, ratio <= max_ratio, ratio, max_ratio, m.latency_samples, min_samples,
                   f"mean p95 {before:.2f} ms -> {after:.2f} ms on {m.latency_devices} devices")


def accuracy_floor_gate(m: GroupMetrics, floor: float, min_samples: int) -> GateResult:
    """Live accuracy over all labelled inferences; passes when >= floor."""
    accuracy = m.correct / m.labelled if m.labelled else None
    return _result(ACCURACY_FLOOR, accuracy is not None and accuracy >= floor, accuracy, floor,
                   m.labelled, min_samples,
                   f"{m.correct} of {m.labelled} labelled inferences right")


def accuracy_drop_gate(m: GroupMetrics, max_drop_points: float, min_samples: int) -> GateResult:
    """Build-time accuracy (of each device's variant, weighted by its labelled inferences) minus
    live accuracy, in percentage points; passes when <= max_drop_points. Devices whose variant
    has no build-time accuracy are left out."""
    if not m.expected_labelled:
        return _result(ACCURACY_DROP, False, None, max_drop_points, 0, min_samples,
                       f"no labelled inferences on variants with a build-time accuracy "
                       f"({m.labelled} labelled in all)")
    expected = m.expected_correct / m.expected_labelled
    live = m.expected_actual / m.expected_labelled
    # From the counts, not from expected - live: fewer roundings, so a drop exactly at the
    # limit compares equal to it.
    drop = (m.expected_correct - m.expected_actual) * 100.0 / m.expected_labelled
    return _result(ACCURACY_DROP, drop <= max_drop_points, drop, max_drop_points,
                   m.expected_labelled, min_samples,
                   f"build-time {expected:.4f}, live {live:.4f}")


def error_rate_gate(m: GroupMetrics, max_rate: float, min_samples: int) -> GateResult:
    """Errors over inferences of the new model; passes when <= max_rate."""
    rate = m.errors / m.inferences if m.inferences else None
    return _result(ERROR_RATE, rate is not None and rate <= max_rate, rate, max_rate,
                   m.inferences, min_samples,
                   f"{m.errors} errors in {m.inferences} inferences on {m.devices} devices")


def evaluate(m: GroupMetrics, gates: Gates) -> tuple[GateResult, ...]:
    """Every configured gate, in a fixed order."""
    results = []
    if gates.max_latency_ratio is not None:
        results.append(latency_gate(m, gates.max_latency_ratio, gates.latency_min_samples))
    if gates.min_accuracy is not None:
        results.append(accuracy_floor_gate(m, gates.min_accuracy, gates.accuracy_min_samples))
    if gates.max_accuracy_drop_points is not None:
        results.append(accuracy_drop_gate(m, gates.max_accuracy_drop_points,
                                          gates.accuracy_min_samples))
    if gates.max_error_rate is not None:
        results.append(error_rate_gate(m, gates.max_error_rate, gates.error_min_samples))
    return tuple(results)


def overall(results: Iterable[GateResult]) -> Verdict:
    """FAILED if any gate failed, else WAITING if any waits, else PASSED (also for no gates)."""
    verdicts = {r.verdict for r in results}
    if Verdict.FAILED in verdicts:
        return Verdict.FAILED
    if Verdict.WAITING in verdicts:
        return Verdict.WAITING
    return Verdict.PASSED
