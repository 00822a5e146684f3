"""The rollout engine: its transition table, hawkBit's group rules, AWS IoT Jobs' retry, timeout
and abort rules, the rate limit, telemetry gates, idempotence and restarts, and properties over
random event sequences."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.rollout.engine import (
    DEVICE_TRANSITIONS,
    FINAL,
    GROUP_TRANSITIONS,
    TRANSITIONS,
    Cause,
    IllegalEvent,
    step,
)
from controller.rollout.events import (
    Abort,
    Action,
    Audit,
    Decision,
    DeployTo,
    DeviceStatus,
    Event,
    Pause,
    Resume,
    RollbackDevice,
    Start,
    Tick,
)
from controller.rollout.model import (
    CommandRef,
    DeploymentState,
    DeviceDeployment,
    DeviceMetrics,
    DeviceTarget,
    GateInputs,
    Gates,
    GroupState,
    OnGateFailure,
    PauseCause,
    RolloutConfig,
    RolloutSnapshot,
    RolloutState,
    group_counts,
    new_rollout,
)
from edgefleet.contract import CommandState

R, G, D = RolloutState, GroupState, DeploymentState
CS = CommandState
V = "digits-v2-int8"


# --- helpers -----------------------------------------------------------------------------------

def config(**changes: object) -> RolloutConfig:
    fields: dict[str, object] = {"success_threshold_percent": 100.0,
                                 "error_threshold_percent": 0.0}
    fields.update(changes)
    return RolloutConfig(**fields)  # type: ignore[arg-type]


def rollout(*sizes: int, cfg: RolloutConfig | None = None, skipped: Iterable[str] = (),
            rollout_id: str = "r1") -> RolloutSnapshot:
    no_variant = set(skipped)
    groups = [(f"g{g}", [DeviceTarget(device_id=f"d{g}-{i}",
                                      variant_id=None if f"d{g}-{i}" in no_variant else V)
                         for i in range(size)])
              for g, size in enumerate(sizes)]
    return new_rollout(rollout_id, "digits", 2, cfg or config(), groups)


def run(snapshot: RolloutSnapshot, *events: Event) -> tuple[RolloutSnapshot, list[Action]]:
    actions: list[Action] = []
    for event in events:
        snapshot, produced = step(snapshot, event)
        actions.extend(produced)
    return snapshot, actions


def device(snapshot: RolloutSnapshot, device_id: str) -> DeviceDeployment:
    return next(g.devices[device_id] for g in snapshot.groups if device_id in g.devices)


def status(snapshot: RolloutSnapshot, device_id: str, state: CommandState, now: float,
           reason: str = "") -> DeviceStatus:
    return DeviceStatus(now=now, device_id=device_id,
                        command_id=device(snapshot, device_id).command_id, state=state,
                        reason=reason)


def report(snapshot: RolloutSnapshot, device_ids: Iterable[str], state: CommandState,
           now: float) -> RolloutSnapshot:
    for device_id in device_ids:
        snapshot, _ = step(snapshot, status(snapshot, device_id, state, now))
    return snapshot


def deploys(actions: Iterable[Action]) -> list[DeployTo]:
    return [a for a in actions if isinstance(a, DeployTo)]


def decisions(actions: Iterable[Action]) -> list[Decision]:
    return [a.decision for a in actions if isinstance(a, Audit)]


def audit(actions: Iterable[Action], decision: Decision) -> Audit:
    found = [a for a in actions if isinstance(a, Audit) and a.decision is decision]
    assert len(found) == 1, decisions(actions)
    return found[0]


def states(snapshot: RolloutSnapshot) -> list[GroupState]:
    return [g.state for g in snapshot.groups]


def ids(group: int, count: int, first: int = 0) -> list[str]:
    return [f"d{group}-{i}" for i in range(first, first + count)]


def encoded(snapshot: RolloutSnapshot) -> bytes:
    return msgspec.json.encode(snapshot)


def metrics_for(device_ids: Iterable[str], *, after_p95: float = 10.0, inferences: int = 1000,
                errors: int = 0, labelled: int = 100, correct: int = 99
                ) -> dict[str, GateInputs]:
    return {d: GateInputs(before=DeviceMetrics(inferences=1000, p95_ms=10.0, labelled=100,
                                               correct=99),
                          after=DeviceMetrics(inferences=inferences, errors=errors,
                                              p95_ms=after_p95, labelled=labelled,
                                              correct=correct))
            for d in device_ids}


# --- snapshots in each rollout state, for the table tests --------------------------------------

def in_state(state: RolloutState) -> RolloutSnapshot:
    draft = rollout(2, 2)
    if state is R.DRAFT:
        return draft
    running, _ = run(draft, Start(now=0))
    if state is R.RUNNING:
        return running
    if state is R.PAUSED:
        return run(running, Pause(now=1, reason="look"))[0]
    if state is R.ABORTED:
        return run(running, Abort(now=1, reason="stop"))[0]
    if state is R.FAILED:
        failing = rollout(2, 2, cfg=config(error_threshold_percent=100))
        failing, _ = run(failing, Start(now=0))
        failing = report(failing, ["d0-0"], CS.FAILED, 1)
        return run(failing, Tick(now=2))[0]
    snapshot = report(running, ids(0, 2), CS.SUCCEEDED, 1)
    snapshot, _ = run(snapshot, Tick(now=2))
    snapshot = report(snapshot, ids(1, 2), CS.SUCCEEDED, 3)
    return run(snapshot, Tick(now=4))[0]


def event_for(cause: Cause, snapshot: RolloutSnapshot, now: float = 10) -> Event:
    in_flight = [d for g in snapshot.groups for d in g.devices.values() if d.command_id]
    target = in_flight[0] if in_flight else next(iter(snapshot.groups[0].devices.values()))
    events: dict[Cause, Event] = {
        Cause.START: Start(now=now),
        Cause.PAUSE: Pause(now=now, reason="operator"),
        Cause.RESUME: Resume(now=now),
        Cause.ABORT: Abort(now=now, reason="operator"),
        Cause.TICK: Tick(now=now),
        Cause.DEVICE_STATUS: DeviceStatus(now=now, device_id=target.device_id,
                                          command_id=target.command_id or "none",
                                          state=CS.IN_PROGRESS),
    }
    return events[cause]


EVENT_CAUSES = (Cause.START, Cause.PAUSE, Cause.RESUME, Cause.ABORT, Cause.TICK,
                Cause.DEVICE_STATUS)


def test_the_fixtures_reach_every_rollout_state() -> None:
    assert [in_state(s).state for s in R] == list(R)


@pytest.mark.parametrize(("state", "cause"), [key for key in TRANSITIONS
                                              if key[1] in EVENT_CAUSES],
                         ids=lambda v: v.value)
def test_every_event_transition_in_the_table(state: RolloutState, cause: Cause) -> None:
    snapshot = in_state(state)

    after, _ = step(snapshot, event_for(cause, snapshot))

    assert after.state is TRANSITIONS[(state, cause)]


@pytest.mark.parametrize(("state", "cause"), [(s, c) for s in R for c in EVENT_CAUSES
                                              if (s, c) not in TRANSITIONS],
                         ids=lambda v: v.value)
def test_every_event_not_in_the_table_raises_and_leaves_the_snapshot(
        state: RolloutState, cause: Cause) -> None:
    snapshot = in_state(state)
    before = encoded(snapshot)

    with pytest.raises(IllegalEvent, match=f"no transition from {state.value} on {cause.value}"):
        step(snapshot, event_for(cause, snapshot))

    assert encoded(snapshot) == before


def _decided_by(cause: Cause) -> RolloutSnapshot:
    """A running rollout after one Tick in which the engine decided `cause`."""
    gates = Gates(min_accuracy=0.99, accuracy_min_samples=1)
    cfg, reported, telemetry = {
        Cause.ERROR_THRESHOLD: (config(success_threshold_percent=50), CS.FAILED, {}),
        Cause.GATE_FAILED: (config(gates=gates), CS.SUCCEEDED,
                            metrics_for(ids(0, 2), correct=0)),
        Cause.GATE_FAILED_ROLLBACK: (config(gates=gates, on_gate_failure=OnGateFailure.ROLLBACK),
                                     CS.SUCCEEDED, metrics_for(ids(0, 2), correct=0)),
        Cause.SUCCESS_UNREACHABLE: (config(error_threshold_percent=100), CS.FAILED, {}),
        Cause.ABORT_CRITERIA: (config(error_threshold_percent=100, success_threshold_percent=0,
                                      abort_failure_percent=50), CS.FAILED, {}),
        Cause.COMPLETED: (config(), CS.SUCCEEDED, {}),
    }[cause]
    snapshot, _ = run(rollout(2, cfg=cfg), Start(now=0))
    snapshot = report(msgspec.structs.replace(snapshot, telemetry=telemetry), ids(0, 2),
                      reported, 1)
    return run(snapshot, Tick(now=2))[0]


@pytest.mark.parametrize(("state", "cause"), [key for key in TRANSITIONS
                                              if key[1] not in EVENT_CAUSES],
                         ids=lambda v: v.value)
def test_every_engine_decision_in_the_table(state: RolloutState, cause: Cause) -> None:
    assert _decided_by(cause).state is TRANSITIONS[(state, cause)]


def test_final_states_accept_only_ticks_and_late_device_statuses() -> None:
    for (state, cause), target in TRANSITIONS.items():
        if state in FINAL:
            assert cause in (Cause.TICK, Cause.DEVICE_STATUS) and target is state


def test_no_group_transition_leaves_a_succeeded_or_cancelled_group() -> None:
    assert not [key for key in GROUP_TRANSITIONS if key[0] in (G.SUCCEEDED, G.CANCELLED)]


def device_in(state: DeploymentState) -> RolloutSnapshot:
    """A running (or, for ROLLING_BACK, failed) rollout whose device d0-0 is in `state`."""
    if state is D.ROLLING_BACK:
        cfg = config(gates=Gates(min_accuracy=0.99, accuracy_min_samples=1),
                     on_gate_failure=OnGateFailure.ROLLBACK)
        snapshot, _ = run(rollout(1, cfg=cfg), Start(now=0))
        snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)
        snapshot = msgspec.structs.replace(snapshot, telemetry=metrics_for(["d0-0"], correct=0))
        snapshot, _ = run(snapshot, Tick(now=2))
    else:
        snapshot, _ = run(rollout(2, cfg=config(error_threshold_percent=100,
                                                success_threshold_percent=50)), Start(now=0))
        if state is D.SUCCEEDED:
            snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)
    assert device(snapshot, "d0-0").state is state
    return snapshot


@pytest.mark.parametrize(("was", "reported"),
                         [(s, c) for s in (D.IN_PROGRESS, D.ROLLING_BACK, D.SUCCEEDED)
                          for c in CS], ids=lambda v: v.value)
def test_every_device_status_transition_in_the_table(was: DeploymentState,
                                                     reported: CommandState) -> None:
    snapshot = device_in(was)

    after, _ = step(snapshot, status(snapshot, "d0-0", reported, 50))

    expected = DEVICE_TRANSITIONS.get((was, reported))
    if expected is None:                       # a late or duplicate report: nothing changes
        assert after is snapshot
    else:
        assert device(after, "d0-0").state is expected   # FAILED: no retries configured


def test_start_deploys_the_first_group_only() -> None:
    snapshot, actions = run(rollout(3, 2), Start(now=5))

    assert snapshot.state is R.RUNNING and snapshot.started_at == 5
    assert states(snapshot) == [G.RUNNING, G.PENDING]
    assert [(a.device_id, a.variant_id, a.attempt, a.group) for a in deploys(actions)] == [
        (d, V, 1, 0) for d in ids(0, 3)]
    assert {d.state for d in snapshot.groups[0].devices.values()} == {D.IN_PROGRESS}
    assert decisions(actions) == [Decision.ROLLOUT_STARTED, Decision.GROUP_STARTED,
                                  Decision.DEVICES_STARTED]


# --- hawkBit's group rules ---------------------------------------------------------------------

def test_hawkbit_success_threshold_reached_moves_on_to_the_next_group() -> None:
    snapshot, _ = run(rollout(4, 3, cfg=config(success_threshold_percent=50,
                                               error_threshold_percent=50)), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)

    below, actions = run(snapshot, Tick(now=2))
    assert states(below) == [G.RUNNING, G.PENDING] and not deploys(actions)

    snapshot = report(below, ["d0-1"], CS.SUCCEEDED, 3)   # 2 of 4 = 50%: >= is enough
    snapshot, actions = run(snapshot, Tick(now=4))

    assert states(snapshot) == [G.SUCCEEDED, G.RUNNING]
    assert [a.device_id for a in deploys(actions)] == ids(1, 3)
    reached = audit(actions, Decision.SUCCESS_THRESHOLD_REACHED)
    assert reached.group == 0
    assert reached.details == {"succeeded": 2, "total": 4, "succeeded_percent": 50.0,
                               "threshold_percent": 50, "soak_s": 0.0}


def test_hawkbit_error_threshold_pauses_the_rollout() -> None:
    cfg = config(success_threshold_percent=75, error_threshold_percent=25)
    snapshot, _ = run(rollout(4, 2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.FAILED, 1)

    at_limit, _ = run(snapshot, Tick(now=2))             # 1 of 4 = 25%: not over 25%
    assert at_limit.state is R.RUNNING

    snapshot = report(at_limit, ["d0-1"], CS.FAILED, 3)
    snapshot, actions = run(snapshot, Tick(now=4))

    assert snapshot.state is R.PAUSED and snapshot.paused_by is PauseCause.ERROR_THRESHOLD
    assert "2 of 4 devices failed" in snapshot.reason
    assert states(snapshot) == [G.RUNNING, G.PENDING]
    assert audit(actions, Decision.ERROR_THRESHOLD_EXCEEDED).details == {
        "failed": 2, "acknowledged": 0, "total": 4, "failed_percent": 50.0,
        "threshold_percent": 25}


def test_hawkbit_error_condition_is_checked_before_the_success_condition() -> None:
    snapshot, _ = run(rollout(4, 2, cfg=config(success_threshold_percent=50,
                                               error_threshold_percent=25)), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.SUCCEEDED, 1)
    snapshot = report(snapshot, ids(0, 2, first=2), CS.FAILED, 1)

    snapshot, actions = run(snapshot, Tick(now=2))        # both conditions hold

    assert snapshot.state is R.PAUSED
    assert states(snapshot) == [G.RUNNING, G.PENDING]
    assert not deploys(actions)
    assert Decision.SUCCESS_THRESHOLD_REACHED not in decisions(actions)


def test_hawkbit_empty_group_counts_as_success() -> None:
    # g1 is empty and g2 holds only a device no variant fits: both succeed at once.
    snapshot, _ = run(rollout(1, 0, 1, 2, skipped=["d2-0"]), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)

    snapshot, actions = run(snapshot, Tick(now=2))

    assert states(snapshot) == [G.SUCCEEDED, G.SUCCEEDED, G.SUCCEEDED, G.RUNNING]
    assert [a.details["total"] for a in actions if isinstance(a, Audit)
            and a.decision is Decision.GROUP_EMPTY] == [0, 0]
    assert [a.device_id for a in deploys(actions)] == ids(3, 2)


def test_a_device_no_variant_fits_is_skipped_and_left_out_of_the_totals() -> None:
    snapshot, actions = run(rollout(3, 1, skipped=["d0-1"]), Start(now=0))

    assert device(snapshot, "d0-1").state is D.SKIPPED
    assert "no variant fits" in device(snapshot, "d0-1").reason
    assert [a.device_id for a in deploys(actions)] == ["d0-0", "d0-2"]
    snapshot = report(snapshot, ["d0-0", "d0-2"], CS.SUCCEEDED, 1)
    snapshot, _ = run(snapshot, Tick(now=2))              # 2 of 2 counted devices: 100%
    assert states(snapshot) == [G.SUCCEEDED, G.RUNNING]


def test_a_rollout_that_can_no_longer_reach_its_success_threshold_fails() -> None:
    cfg = config(success_threshold_percent=75, error_threshold_percent=50)
    snapshot, _ = run(rollout(4, 2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.FAILED, 1)  # at most 2 of 4 can now succeed

    snapshot, actions = run(snapshot, Tick(now=2))

    assert snapshot.state is R.FAILED and snapshot.finished_at == 2
    assert states(snapshot) == [G.FAILED, G.CANCELLED]
    assert {d.state for d in snapshot.groups[1].devices.values()} == {D.CANCELLED}
    assert audit(actions, Decision.SUCCESS_UNREACHABLE).details == {
        "failed": 2, "total": 4, "threshold_percent": 75}


def test_the_rollout_succeeds_once_every_group_passed() -> None:
    snapshot, actions = run(rollout(2, 1), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.SUCCEEDED, 1)
    snapshot, _ = run(snapshot, Tick(now=2))
    snapshot = report(snapshot, ["d1-0"], CS.SUCCEEDED, 3)

    snapshot, actions = run(snapshot, Tick(now=4))

    assert snapshot.state is R.SUCCEEDED and snapshot.finished_at == 4
    assert states(snapshot) == [G.SUCCEEDED, G.SUCCEEDED]
    assert decisions(actions) == [Decision.SUCCESS_THRESHOLD_REACHED, Decision.GROUP_SUCCEEDED,
                                  Decision.ROLLOUT_SUCCEEDED]


def test_the_rollout_succeeds_only_once_no_device_waits_or_is_in_flight() -> None:
    cfg = config(success_threshold_percent=50, max_starts_per_minute=1)
    snapshot, _ = run(rollout(2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)

    snapshot, _ = run(snapshot, Tick(now=2))              # the group passed; d0-1 still waits
    assert states(snapshot) == [G.SUCCEEDED] and snapshot.state is R.RUNNING

    snapshot, actions = run(snapshot, Tick(now=61))
    assert [a.device_id for a in deploys(actions)] == ["d0-1"]
    assert snapshot.state is R.RUNNING                    # d0-1 is in flight

    snapshot = report(snapshot, ["d0-1"], CS.FAILED, 62)  # a final outcome either way
    snapshot, _ = run(snapshot, Tick(now=63))
    assert snapshot.state is R.SUCCEEDED


# --- AWS IoT Jobs' device rules ----------------------------------------------------------------

def test_aws_a_failed_attempt_is_retried_until_attempts_run_out() -> None:
    cfg = config(max_retries=2, error_threshold_percent=100)
    snapshot, first = run(rollout(1, 1, cfg=cfg), Start(now=0))
    sent = deploys(first)
    for now in (1, 3):
        snapshot = report(snapshot, ["d0-0"], CS.FAILED, now)
        assert device(snapshot, "d0-0").state is D.PENDING        # waiting for its retry
        snapshot, actions = run(snapshot, Tick(now=now + 1))
        sent += deploys(actions)

    snapshot = report(snapshot, ["d0-0"], CS.FAILED, 5)

    assert [(a.attempt, a.command_id) for a in sent] == [
        (n, f"r1:d0-0:deploy:{n}") for n in (1, 2, 3)]
    final = device(snapshot, "d0-0")
    assert (final.state, final.attempts, final.finished_at) == (D.FAILED, 3, 5)
    snapshot, actions = run(snapshot, Tick(now=6))
    assert not deploys(actions)


def test_aws_rejected_commands_are_not_retried() -> None:
    snapshot, _ = run(rollout(1, cfg=config(max_retries=3, error_threshold_percent=100)),
                      Start(now=0))

    snapshot = report(snapshot, ["d0-0"], CS.REJECTED, 1)

    assert device(snapshot, "d0-0").state is D.REJECTED
    assert not deploys(run(snapshot, Tick(now=2))[1])


def test_a_device_that_rolled_itself_back_counts_as_a_failed_attempt() -> None:
    snapshot, _ = run(rollout(1, cfg=config(max_retries=1, error_threshold_percent=100)),
                      Start(now=0))

    snapshot, actions = run(snapshot, status(snapshot, "d0-0", CS.ROLLED_BACK, 1, "NaN output"))

    assert device(snapshot, "d0-0").state is D.PENDING
    assert device(snapshot, "d0-0").reason == "attempt 1 rolled-back: NaN output"
    assert audit(actions, Decision.DEVICE_ATTEMPT_FAILED).details["retry"] is True


def test_aws_in_progress_timeout_ends_the_attempt_timed_out() -> None:
    cfg = config(in_progress_timeout_s=100, error_threshold_percent=100)
    snapshot, _ = run(rollout(2, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-1"], CS.IN_PROGRESS, 50)  # progress does not extend it

    early, _ = run(snapshot, Tick(now=99.9))
    assert device(early, "d0-0").state is D.IN_PROGRESS

    snapshot, actions = run(snapshot, Tick(now=100))

    assert [device(snapshot, d).state for d in ids(0, 2)] == [D.TIMED_OUT, D.TIMED_OUT]
    assert device(snapshot, "d0-0").finished_at == 100
    timed_out = [a for a in actions if isinstance(a, Audit)
                 and a.decision is Decision.DEVICE_TIMED_OUT]
    assert timed_out[0].details["timeout_s"] == 100 and timed_out[0].details["retry"] is False


def test_aws_a_timed_out_attempt_is_retried_at_once_when_attempts_remain() -> None:
    cfg = config(in_progress_timeout_s=100, max_retries=1)
    snapshot, _ = run(rollout(1, cfg=cfg), Start(now=0))

    snapshot, actions = run(snapshot, Tick(now=100))

    assert [(a.attempt, a.command_id) for a in deploys(actions)] == [(2, "r1:d0-0:deploy:2")]
    assert device(snapshot, "d0-0").started_at == 100
    snapshot, _ = run(snapshot, Tick(now=200))
    assert device(snapshot, "d0-0").state is D.TIMED_OUT


def test_aws_abort_criteria_count_distinct_devices_not_retries() -> None:
    cfg = config(success_threshold_percent=50, error_threshold_percent=100, max_retries=3,
                 abort_failure_percent=50, abort_min_devices=2)
    snapshot, _ = run(rollout(3, cfg=cfg), Start(now=0))
    now = 1.0
    for _ in range(3):                    # three failed attempts of one device: no outcome yet
        snapshot = report(snapshot, ["d0-0"], CS.FAILED, now)
        snapshot, _ = run(snapshot, Tick(now=now + 1))
        now += 2
    assert snapshot.state is R.RUNNING and device(snapshot, "d0-0").attempts == 4

    snapshot = report(snapshot, ["d0-0"], CS.FAILED, now)   # its last attempt: 1 outcome
    snapshot, _ = run(snapshot, Tick(now=now))
    assert snapshot.state is R.RUNNING                       # 1 < abort_min_devices

    snapshot = report(snapshot, ["d0-1"], CS.SUCCEEDED, now)
    snapshot, actions = run(snapshot, Tick(now=now + 1))     # 1 of 2 devices = 50%

    assert snapshot.state is R.ABORTED
    assert audit(actions, Decision.ABORT_CRITERIA_MET).details == {
        "failed_devices": 1, "executed_devices": 2, "failed_percent": 50.0,
        "threshold_percent": 50, "min_devices": 2}
    assert device(snapshot, "d0-2").state is D.IN_PROGRESS   # in flight: left to report


def test_aws_abort_criteria_wait_for_the_minimum_number_of_devices() -> None:
    cfg = config(success_threshold_percent=50, error_threshold_percent=100,
                 abort_failure_percent=10, abort_min_devices=3)
    snapshot, _ = run(rollout(4, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ids(0, 2), CS.FAILED, 1)

    snapshot, _ = run(snapshot, Tick(now=2))
    assert snapshot.state is R.RUNNING

    snapshot = report(snapshot, ["d0-2"], CS.SUCCEEDED, 3)
    snapshot, _ = run(snapshot, Tick(now=4))
    assert snapshot.state is R.ABORTED
    assert "2 of 3 devices failed" in snapshot.reason


# --- rate limit --------------------------------------------------------------------------------

def test_rate_limit_starts_at_most_n_devices_in_any_minute() -> None:
    snapshot, actions = run(rollout(8, cfg=config(max_starts_per_minute=3)), Start(now=0))
    assert len(deploys(actions)) == 3
    assert audit(actions, Decision.DEVICES_STARTED).details == {
        "started": 3, "waiting": 8, "limit_per_minute": 3, "started_last_60s": 0}

    for now in (0, 30, 59.9):
        snapshot, actions = run(snapshot, Tick(now=now))
        assert not deploys(actions)

    snapshot, actions = run(snapshot, Tick(now=60))
    assert [a.device_id for a in deploys(actions)] == ids(0, 3, first=3)
    assert snapshot.start_log == (60.0, 60.0, 60.0)


def test_rate_limit_counts_retries_and_serves_earlier_groups_first() -> None:
    cfg = config(max_starts_per_minute=2, max_retries=1, success_threshold_percent=50,
                 error_threshold_percent=100)
    snapshot, _ = run(rollout(2, 3, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)
    snapshot = report(snapshot, ["d0-1"], CS.FAILED, 1)

    snapshot, actions = run(snapshot, Tick(now=60))

    # g0 passed (50%), g1 started; the retry of d0-1 goes first and takes one of the two slots.
    assert [(a.device_id, a.attempt) for a in deploys(actions)] == [("d0-1", 2), ("d1-0", 1)]


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


# --- idempotence, determinism, restarts --------------------------------------------------------

@pytest.mark.parametrize("reported", [s for s in CS if s is not CS.UNKNOWN])
def test_the_same_device_status_twice_changes_nothing_the_second_time(
        reported: CommandState) -> None:
    snapshot, _ = run(rollout(2, cfg=config(max_retries=1, error_threshold_percent=100)),
                      Start(now=0))
    event = status(snapshot, "d0-0", reported, 5, "why")

    once, _ = step(snapshot, event)
    twice, actions = step(once, event)

    assert twice == once and actions == ()


def test_a_status_for_an_older_attempt_or_an_unknown_device_changes_nothing() -> None:
    snapshot, _ = run(rollout(1, cfg=config(max_retries=1, error_threshold_percent=100)),
                      Start(now=0))
    stale = status(snapshot, "d0-0", CS.SUCCEEDED, 5)
    snapshot = report(snapshot, ["d0-0"], CS.FAILED, 1)
    snapshot, _ = run(snapshot, Tick(now=2))                 # attempt 2 is in flight

    for event in (stale, DeviceStatus(now=5, device_id="elsewhere", command_id="x",
                                      state=CS.SUCCEEDED),
                  msgspec.structs.replace(stale, command_id="r1:d0-0:deploy:2",
                                          state=CS.UNKNOWN)):
        after, actions = step(snapshot, event)
        assert after is snapshot and actions == ()


def test_a_second_tick_at_the_same_time_starts_nothing_more() -> None:
    cfg = config(max_starts_per_minute=2, success_threshold_percent=50)
    snapshot, _ = run(rollout(2, 0, 3, cfg=cfg), Start(now=0))
    snapshot = report(snapshot, ["d0-0"], CS.SUCCEEDED, 1)

    once, actions = step(snapshot, Tick(now=70))
    twice, again = step(once, Tick(now=70))

    assert deploys(actions) and states(once) == [G.SUCCEEDED, G.SUCCEEDED, G.RUNNING]
    assert again == () and twice == once


def test_command_ids_are_derived_from_rollout_device_and_attempt() -> None:
    first = run(rollout(3, rollout_id="fleet-7"), Start(now=0))[1]
    second = run(rollout(3, rollout_id="fleet-7"), Start(now=0))[1]

    assert first == second
    for action in deploys(first):
        ref = CommandRef.parse(action.command_id)
        assert ref == CommandRef(rollout_id="fleet-7", device_id=action.device_id,
                                 kind="deploy", attempt=action.attempt)
    assert CommandRef.parse("fleet-7:d0-0:deploy:x") is None
    assert CommandRef.parse("someone-else's id") is None


def test_a_restarted_controller_resumes_from_the_saved_snapshot_without_redeploying() -> None:
    snapshot, sent = run(rollout(4, cfg=config(max_starts_per_minute=2)), Start(now=0))
    saved = msgspec.json.encode(snapshot)                      # committed, then a crash

    loaded = msgspec.json.decode(saved, type=RolloutSnapshot)
    assert loaded == snapshot
    resumed, actions = run(loaded, Tick(now=1), Tick(now=30))
    assert not deploys(actions)
    resumed, actions = run(resumed, Tick(now=60))
    assert [a.device_id for a in deploys(actions)] == ["d0-2", "d0-3"]

    # A crash before the commit replays the step: the same commands under the same ids.
    replayed = run(rollout(4, cfg=config(max_starts_per_minute=2)), Start(now=0))[1]
    assert deploys(replayed) == deploys(sent)


# --- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("success_threshold_percent", 101), ("success_threshold_percent", -1),
    ("error_threshold_percent", 100.5), ("error_threshold_percent", float("nan")),
    ("max_retries", -1), ("max_retries", 1.5), ("in_progress_timeout_s", 0),
    ("max_starts_per_minute", 0), ("abort_failure_percent", 0), ("abort_failure_percent", 120),
    ("abort_min_devices", 0), ("soak_s", -5), ("on_gate_failure", "explode"),
])
def test_bad_thresholds_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        RolloutConfig(**{field: value})  # type: ignore[arg-type]


def test_new_rollout_refuses_bad_ids_and_devices_targeted_twice() -> None:
    one = [DeviceTarget(device_id="a", variant_id=V)]
    with pytest.raises(ValueError, match="rollout_id"):
        new_rollout("has space", "m", 1, config(), [("g", one)])
    with pytest.raises(ValueError, match="more than once: a"):
        new_rollout("r", "m", 1, config(), [("g", one), ("h", one)])
    with pytest.raises(ValueError, match="invalid device ids"):
        new_rollout("r", "m", 1, config(), [("g", [DeviceTarget(device_id="a/b",
                                                                variant_id=V)])])
    with pytest.raises(ValueError, match="at least one group"):
        new_rollout("r", "m", 1, config(), [])


# --- properties over random event sequences ----------------------------------------------------

@st.composite
def configs(draw: st.DrawFn) -> RolloutConfig:
    gates = draw(st.sampled_from([
        Gates(),
        Gates(max_latency_ratio=1.2, latency_min_samples=50, timeout_s=50),
        Gates(min_accuracy=0.9, max_error_rate=0.1, accuracy_min_samples=10,
              error_min_samples=10, timeout_s=30),
    ]))
    abort = draw(st.sampled_from([None, 30.0, 100.0]))
    return RolloutConfig(
        success_threshold_percent=draw(st.sampled_from([0.0, 50.0, 75.0, 100.0])),
        error_threshold_percent=draw(st.sampled_from([0.0, 25.0, 50.0, 100.0])),
        max_retries=draw(st.integers(0, 2)),
        in_progress_timeout_s=draw(st.sampled_from([None, 20.0])),
        max_starts_per_minute=draw(st.sampled_from([None, 1, 2])),
        abort_failure_percent=abort,
        abort_min_devices=draw(st.integers(1, 3)),
        soak_s=draw(st.sampled_from([0.0, 15.0])),
        gates=gates,
        on_gate_failure=draw(st.sampled_from(list(OnGateFailure))))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[RolloutSnapshot, list[Event]]:
    sizes = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    all_ids = [f"d{g}-{i}" for g, n in enumerate(sizes) for i in range(n)]
    skipped = draw(st.sets(st.sampled_from(all_ids))) if all_ids else set()
    snapshot = rollout(*sizes, cfg=draw(configs()), skipped=skipped)
    telemetry = {d: GateInputs(
        before=DeviceMetrics(inferences=100, p95_ms=10.0),
        after=DeviceMetrics(inferences=draw(st.integers(0, 60)), errors=draw(st.integers(0, 9)),
                            p95_ms=draw(st.sampled_from([9.0, 11.0, 14.0])),
                            labelled=20, correct=draw(st.integers(15, 20))))
        for d in all_ids if draw(st.integers(0, 4))}
    snapshot = msgspec.structs.replace(snapshot, telemetry=telemetry)
    # Mostly started at once, and mostly reports of success, so runs get past the first group.
    events: list[Event] = [Start(now=0.0)] if draw(st.integers(0, 4)) else []
    now = 0.0
    for _ in range(draw(st.integers(1, 40))):
        now += draw(st.sampled_from([0.0, 1.0, 7.0, 25.0, 61.0]))
        kind = draw(st.sampled_from(["tick"] * 3 + ["status"] * 4 + ["start", "pause",
                                                                     "resume", "abort"]))
        if kind == "status" and all_ids:
            events.append(DeviceStatus(
                now=now, device_id=draw(st.sampled_from(all_ids)),
                command_id=draw(st.sampled_from(["current"] * 4 + ["stale"])),
                state=draw(st.sampled_from([CS.SUCCEEDED] * 6 + list(CS)))))
        elif kind == "start":
            events.append(Start(now=now))
        elif kind == "pause":
            events.append(Pause(now=now))
        elif kind == "resume":
            events.append(Resume(now=now))
        elif kind == "abort" and draw(st.integers(0, 9)) == 0:
            events.append(Abort(now=now))
        else:
            events.append(Tick(now=now))
    return snapshot, events


def _with_command_id(snapshot: RolloutSnapshot, event: Event) -> Event:
    """Fills a generated status's command id: the device's current one, or an older attempt's."""
    if not isinstance(event, DeviceStatus):
        return event
    current = device(snapshot, event.device_id)
    if event.command_id == "current":
        command_id = current.command_id
    else:
        command_id = f"r1:{event.device_id}:deploy:{max(current.attempts - 1, 0)}"
    return msgspec.structs.replace(event, command_id=command_id)


def _devices(snapshot: RolloutSnapshot) -> dict[str, tuple[int, DeviceDeployment]]:
    return {d.device_id: (g.index, d) for g in snapshot.groups for d in g.devices.values()}


def _reachable() -> dict[GroupState, set[GroupState]]:
    """Group states reachable from each state through GROUP_TRANSITIONS (itself included)."""
    reach = {state: {state} for state in G}
    changed = True
    while changed:
        changed = False
        for (source, _), target in GROUP_TRANSITIONS.items():
            for found in reach.values():
                if source in found and target not in found:
                    found.add(target)
                    changed = True
    return reach


REACHABLE = _reachable()


def _check_invariants(snapshot: RolloutSnapshot) -> None:
    for group in snapshot.groups:
        counts = group_counts(group)
        assert sum(counts.values()) == len(group.devices)
        assert all(n >= 0 for n in counts.values())
    # A group runs only after every group before it passed its gates.
    for j, group in enumerate(snapshot.groups):
        if group.state not in (G.PENDING, G.CANCELLED):
            assert all(g.state is G.SUCCEEDED for g in snapshot.groups[:j]), states(snapshot)
    if snapshot.state is R.SUCCEEDED:
        assert all(g.state is G.SUCCEEDED for g in snapshot.groups)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_event_sequences_keep_the_engine_invariants(
        scenario: tuple[RolloutSnapshot, Sequence[Event]]) -> None:
    snapshot, events = scenario
    max_attempts = snapshot.config.max_attempts
    deployed: Counter[str] = Counter()
    command_ids: set[str] = set()
    for raw in events:
        event = _with_command_id(snapshot, raw)
        frozen = encoded(snapshot)
        try:
            after, actions = step(snapshot, event)
        except IllegalEvent:
            assert encoded(snapshot) == frozen
            continue
        assert encoded(snapshot) == frozen                 # the input is never mutated
        before_devices, after_devices = _devices(snapshot), _devices(after)

        sent = deploys(actions)
        timed_out = {a.details["device_id"] for a in actions if isinstance(a, Audit)
                     and a.decision is Decision.DEVICE_TIMED_OUT and a.details["retry"]}
        new_attempts = {d for d, (_, dev) in after_devices.items()
                        if dev.state is D.IN_PROGRESS
                        and dev.command_id != before_devices[d][1].command_id}
        # DeployTo exactly for devices under a new command id, once each.
        assert sorted(a.device_id for a in sent) == sorted(new_attempts)
        for action in sent:
            group, now_dev = after_devices[action.device_id]
            was = before_devices[action.device_id][1]
            # Never for a device in flight or finished: it was waiting, or its attempt timed
            # out in this very step.
            assert was.state is D.PENDING or (was.state is D.IN_PROGRESS
                                              and action.device_id in timed_out)
            assert (action.group, action.command_id, action.attempt) == (
                group, now_dev.command_id, now_dev.attempts)
            assert action.command_id not in command_ids
            command_ids.add(action.command_id)
            deployed[action.device_id] += 1
            assert deployed[action.device_id] <= max_attempts
            assert after.state is R.RUNNING
        _check_invariants(after)
        for old_group, new_group in zip(snapshot.groups, after.groups, strict=True):
            assert new_group.state in REACHABLE[old_group.state], (old_group.state,
                                                                   new_group.state)

        if isinstance(event, Tick):                        # a second tick does nothing
            again, repeated = step(after, event)
            assert again == after and repeated == ()
        snapshot = after
