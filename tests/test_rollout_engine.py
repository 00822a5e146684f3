"""The rollout engine: its transition tables, idempotence and restarts, configuration, and
properties over random event sequences. The group, retry and gate rules have files of their
own (test_rollout_engine_policies.py, test_rollout_engine_gates.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

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
    Audit,
    Decision,
    DeviceStatus,
    Event,
    Pause,
    Resume,
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
    RolloutConfig,
    RolloutSnapshot,
    RolloutState,
    group_counts,
    new_rollout,
)
from edgefleet.contract import CommandState
from tests.rollout_helpers import (
    CS,
    D,
    G,
    R,
    V,
    config,
    decisions,
    deploys,
    device,
    encoded,
    ids,
    metrics_for,
    report,
    rollout,
    run,
    states,
    status,
)

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
