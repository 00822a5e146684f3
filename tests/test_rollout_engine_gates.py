"""The rollout engine's telemetry gates (soak, samples, timeout, pause or roll back) and the
operator's events (pause, resume, abort)."""

from __future__ import annotations

import msgspec

from controller.rollout.events import Abort, Decision, Pause, Resume, RollbackDevice, Start, Tick
from controller.rollout.model import (
    Gates,
    OnGateFailure,
    PauseCause,
    RolloutConfig,
    RolloutSnapshot,
)
from tests.rollout_helpers import (
    CS,
    D,
    G,
    R,
    audit,
    config,
    deploys,
    device,
    ids,
    metrics_for,
    report,
    rollout,
    run,
    states,
)

# --- telemetry gates ---------------------------------------------------------------------------

GATES = Gates(max_latency_ratio=1.2, min_accuracy=0.9, max_error_rate=0.05,
              latency_min_samples=100, accuracy_min_samples=100, error_min_samples=100,
              timeout_s=600)


def soaking(cfg: RolloutConfig) -> RolloutSnapshot:
    snapshot, _ = run(rollout(2, 2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.SUCCEEDED, 1)
    snapshot, _ = run(snapshot, Tick(now=10))
    assert states(snapshot) == [G.SOAKING, G.PENDING] and snapshot.groups[0].soak_started_at == 10
    return snapshot


def test_gates_wait_for_the_soak_then_pass_and_the_next_group_starts() -> None:
    snapshot = soaking(config(soak_s=300, gates=GATES))
    snapshot = msgspec.structs.replace(snapshot, telemetry=metrics_for(ids(0, 2)))

    soon, actions = run(snapshot, Tick(now=309))
    assert states(soon) == [G.SOAKING, G.PENDING] and not actions

    snapshot, actions = run(snapshot, Tick(now=310))

    assert states(snapshot) == [G.SUCCEEDED, G.RUNNING]
    assert [a.device_id for a in deploys(actions)] == ids(1, 2)
    details = audit(actions, Decision.GROUP_SUCCEEDED).details
    assert details["p95-latency-ratio.verdict"] == "passed"
    assert details["p95-latency-ratio.measured"] == 1.0
    assert details["accuracy-floor.measured"] == 0.99
    assert details["error-rate.samples"] == 2000
    assert details["gate_devices"] == 2


def test_a_gate_with_too_few_samples_waits_rather_than_passes() -> None:
    snapshot = soaking(config(gates=GATES))
    snapshot = msgspec.structs.replace(snapshot, telemetry=metrics_for(["d0-0"], inferences=40,
                                                                       labelled=40, correct=40))

    snapshot, actions = run(snapshot, Tick(now=20))

    assert states(snapshot) == [G.SOAKING, G.PENDING] and not actions


def test_a_gate_that_never_gets_samples_times_out_as_a_failure() -> None:
    snapshot = soaking(config(soak_s=60, gates=GATES))   # no telemetry at all

    waiting, _ = run(snapshot, Tick(now=10 + 60 + 599))
    assert waiting.state is R.RUNNING

    snapshot, actions = run(snapshot, Tick(now=10 + 60 + 600))

    assert snapshot.state is R.PAUSED and snapshot.paused_by is PauseCause.GATE_FAILED
    assert states(snapshot) == [G.FAILED, G.PENDING]
    details = audit(actions, Decision.GATES_TIMED_OUT).details
    assert details["error-rate.verdict"] == "waiting" and details["error-rate.samples"] == 0


def test_a_failing_gate_pauses_and_resume_soaks_the_group_again() -> None:
    snapshot = soaking(config(soak_s=60, gates=GATES))
    slow = metrics_for(ids(0, 2), after_p95=15.0)
    snapshot = msgspec.structs.replace(snapshot, telemetry=slow)

    snapshot, actions = run(snapshot, Tick(now=70))

    assert snapshot.state is R.PAUSED and snapshot.paused_by is PauseCause.GATE_FAILED
    assert states(snapshot) == [G.FAILED, G.PENDING]
    details = audit(actions, Decision.GATES_FAILED).details
    assert (details["p95-latency-ratio.verdict"], details["p95-latency-ratio.measured"],
            details["p95-latency-ratio.threshold"]) == ("failed", 1.5, 1.2)
    assert details["on_gate_failure"] == "pause"
    assert not [a for a in actions if isinstance(a, RollbackDevice)]

    resumed, _ = run(snapshot, Resume(now=100))
    assert states(resumed) == [G.SOAKING, G.PENDING]
    assert resumed.groups[0].soak_started_at == 100

    fixed = msgspec.structs.replace(resumed, telemetry=metrics_for(ids(0, 2)))
    fixed, actions = run(fixed, Tick(now=160))
    assert states(fixed) == [G.SUCCEEDED, G.RUNNING]


def test_a_failing_gate_under_rollback_rolls_the_group_back_and_fails_the_rollout() -> None:
    cfg = config(success_threshold_percent=50, error_threshold_percent=100, gates=GATES,
                 on_gate_failure=OnGateFailure.ROLLBACK)
    snapshot, _ = run(rollout(3, 2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.SUCCEEDED, 1)  # d0-2 is still installing
    bad = metrics_for(ids(0, 2), errors=500)
    snapshot, _ = run(msgspec.structs.replace(snapshot, telemetry=bad), Tick(now=10))

    assert snapshot.state is R.FAILED
    assert states(snapshot) == [G.FAILED, G.CANCELLED]
    assert [(d.state, d.command_id) for d in snapshot.groups[0].devices.values()] == [
        (D.ROLLING_BACK, f"r1:d0-{i}:rollback:1") for i in range(3)]
    assert {d.state for d in snapshot.groups[1].devices.values()} == {D.CANCELLED}

    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 11)
    snapshot = report(snapshot, ["d0-1"], CS.FAILED, 11)
    assert [device(snapshot, d).state for d in ids(0, 2)] == [D.ROLLED_BACK, D.ROLLBACK_FAILED]


def test_rollback_actions_name_each_device_and_the_reason() -> None:
    cfg = config(gates=GATES, on_gate_failure=OnGateFailure.ROLLBACK)
    snapshot = soaking(cfg)
    snapshot = msgspec.structs.replace(snapshot, telemetry=metrics_for(ids(0, 2), correct=50))

    _, actions = run(snapshot, Tick(now=20))

    rollbacks = [a for a in actions if isinstance(a, RollbackDevice)]
    assert [(a.device_id, a.command_id, a.group) for a in rollbacks] == [
        ("d0-0", "r1:d0-0:rollback:1", 0), ("d0-1", "r1:d0-1:rollback:1", 0)]
    assert all("telemetry gate failed" in a.reason for a in rollbacks)
    assert audit(actions, Decision.ROLLBACK_STARTED).details["devices"] == 2
    assert audit(actions, Decision.GATES_FAILED).details["accuracy-floor.measured"] == 0.5


def test_a_soaking_group_still_pauses_on_the_error_threshold() -> None:
    cfg = config(success_threshold_percent=50, error_threshold_percent=25, soak_s=600)
    snapshot, _ = run(rollout(4, 1, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.SUCCEEDED, 1)
    snapshot, _ = run(snapshot, Tick(now=2))
    assert states(snapshot) == [G.SOAKING, G.PENDING]

    snapshot = report(snapshot, ids(0, 2, first=2), CS.FAILED, 3)
    snapshot, _ = run(snapshot, Tick(now=700))

    assert snapshot.state is R.PAUSED and states(snapshot) == [G.SOAKING, G.PENDING]


# --- operator events ---------------------------------------------------------------------------

def test_a_paused_rollout_starts_nothing_but_records_statuses_and_timeouts() -> None:
    cfg = config(max_starts_per_minute=1, in_progress_timeout_s=100, max_retries=1,
                 error_threshold_percent=100)
    snapshot, _ = run(rollout(3, cfg=cfg), Start(now=0), Pause(now=1, reason="lunch"))
    assert snapshot.paused_by is PauseCause.OPERATOR and snapshot.reason == "lunch"

    snapshot, actions = run(snapshot, Tick(now=100))

    assert not deploys(actions)
    assert device(snapshot, "d0-0").state is D.PENDING        # timed out, retry waits
    snapshot, actions = run(snapshot, Resume(now=101))
    assert [(a.device_id, a.attempt) for a in deploys(actions)] == [("d0-0", 2)]


def test_resume_after_an_error_pause_counts_only_new_failures() -> None:
    cfg = config(success_threshold_percent=50, error_threshold_percent=20)
    snapshot, _ = run(rollout(10, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ids(0, 3), CS.FAILED, 1)
    snapshot, _ = run(snapshot, Tick(now=2))
    assert snapshot.state is R.PAUSED

    snapshot, actions = run(snapshot, Resume(now=3))
    assert snapshot.state is R.RUNNING and snapshot.groups[0].acknowledged_failures == 3
    assert audit(actions, Decision.ROLLOUT_RESUMED).details == {
        "paused_by": "error-threshold", "acknowledged_failures": 3}

    snapshot = report(snapshot, ids(0, 2, first=3), CS.FAILED, 4)   # 2 new of 10: not > 20%
    snapshot, _ = run(snapshot, Tick(now=5))
    assert snapshot.state is R.RUNNING
    snapshot = report(snapshot, ["d0-5"], CS.FAILED, 6)
    snapshot, _ = run(snapshot, Tick(now=7))
    assert snapshot.state is R.PAUSED


def test_abort_cancels_what_never_started_and_keeps_recording_what_is_in_flight() -> None:
    snapshot, _ = run(rollout(2, 2, cfg=config(max_starts_per_minute=1)), Start(now=0))

    snapshot, actions = run(snapshot, Abort(now=5, reason="wrong model"))

    assert snapshot.state is R.ABORTED and snapshot.reason == "wrong model"
    assert states(snapshot) == [G.CANCELLED, G.CANCELLED]
    assert [device(snapshot, d).state for d in ("d0-0", "d0-1", "d1-0")] == [
        D.IN_PROGRESS, D.CANCELLED, D.CANCELLED]
    assert audit(actions, Decision.ROLLOUT_ABORTED).details == {"reason": "wrong model",
                                                                "was": "running"}
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 6)
    assert device(snapshot, "d0-0").state is D.SUCCEEDED
    assert not run(snapshot, Tick(now=100))[1]
