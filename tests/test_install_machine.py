"""The install state machine as tables: scenario chains, recovery after a crash in every state,
and the crash-loop cap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.install.machine import (
    FINAL,
    MAX_ENTRIES,
    RECOVERY,
    TRANSITIONS,
    Event,
    IllegalTransition,
    InstallRecord,
    outcome,
    recover,
    step,
)
from edgefleet.contract import CommandState, InstallStage

S = InstallStage
OK, FAIL, CANCEL = Event.OK, Event.FAILED, Event.CANCELLED


def new() -> InstallRecord:
    return InstallRecord(command_id="c1", command=b"{}", model_name="digits", model_version=2)


def run(events: list[Event]) -> InstallRecord:
    record = new()
    for event in events:
        record = step(record, event, reason="" if event is OK else f"{event.value} here")
    return record


@pytest.mark.parametrize(("events", "chain", "final", "reported"), [
    ([OK] * 7,
     ["received", "verified", "downloading", "staged", "smoke-tested", "activated", "watching",
      "committed"], S.COMMITTED, CommandState.SUCCEEDED),
    ([FAIL], ["received", "rejected"], S.REJECTED, CommandState.REJECTED),
    ([OK, OK, FAIL], ["received", "verified", "downloading", "rejected"], S.REJECTED,
     CommandState.FAILED),
    ([OK, OK, OK, FAIL], ["received", "verified", "downloading", "staged", "rejected"],
     S.REJECTED, CommandState.FAILED),
    ([OK] * 6 + [FAIL, OK],
     ["received", "verified", "downloading", "staged", "smoke-tested", "activated", "watching",
      "rolling-back", "rolled-back"], S.ROLLED_BACK, CommandState.ROLLED_BACK),
    ([OK] * 5 + [CANCEL, OK],
     ["received", "verified", "downloading", "staged", "smoke-tested", "activated",
      "rolling-back", "rolled-back"], S.ROLLED_BACK, CommandState.ROLLED_BACK),
])
def test_scenarios_walk_the_expected_chain(events: list[Event], chain: list[str],
                                           final: InstallStage,
                                           reported: CommandState) -> None:
    record = run(events)
    assert list(record.history) == chain
    assert record.state is final and record.final
    assert outcome(record) is reported


def test_a_failure_keeps_its_reason_and_where_it_happened() -> None:
    record = run([OK] * 6 + [FAIL, OK])
    assert record.reason == "failed here"
    assert record.failed_in is S.WATCHING


@pytest.mark.parametrize("state", list(InstallStage))
def test_illegal_events_raise_and_change_nothing(state: InstallStage) -> None:
    record = InstallRecord(command_id="c", command=b"", model_name="m", model_version=1,
                           state=state)
    for event in Event:
        if (state, event) in TRANSITIONS:
            continue
        with pytest.raises(IllegalTransition):
            step(record, event)
        assert record.state is state


def test_final_states_have_no_way_out() -> None:
    assert not [key for key in TRANSITIONS if key[0] in FINAL]


@pytest.mark.parametrize(("crashed_in", "resumes_in"), [
    (S.RECEIVED, S.RECEIVED), (S.VERIFIED, S.VERIFIED), (S.DOWNLOADING, S.DOWNLOADING),
    (S.STAGED, S.STAGED), (S.SMOKE_TESTED, S.ROLLING_BACK), (S.ACTIVATED, S.ROLLING_BACK),
    (S.WATCHING, S.ROLLING_BACK), (S.ROLLING_BACK, S.ROLLING_BACK),
    (S.COMMITTED, S.COMMITTED), (S.ROLLED_BACK, S.ROLLED_BACK), (S.REJECTED, S.REJECTED),
    (S.UNKNOWN, S.ROLLING_BACK),
])
def test_recovery_table_for_a_crash_in_every_state(crashed_in: InstallStage,
                                                   resumes_in: InstallStage) -> None:
    record = InstallRecord(command_id="c", command=b"", model_name="m", model_version=1,
                           state=crashed_in, entries={crashed_in.value: 1})
    resumed = recover(record)
    assert resumed.state is resumes_in
    if resumes_in is S.ROLLING_BACK and crashed_in is not S.ROLLING_BACK:
        assert resumed.reason == f"agent restarted while {crashed_in.value}"
        assert step(resumed, OK).state is S.ROLLED_BACK


def test_every_unlisted_state_resumes_as_a_rollback() -> None:
    for state in InstallStage:
        if state not in RECOVERY:
            record = InstallRecord(command_id="c", command=b"", model_name="m",
                                   model_version=1, state=state)
            assert recover(record).state is S.ROLLING_BACK


def test_a_crash_loop_while_downloading_ends_the_install() -> None:
    record = run([OK, OK])
    for _ in range(MAX_ENTRIES - 1):
        record = recover(record)
        assert record.state is S.DOWNLOADING
    record = recover(record)
    assert record.state is S.REJECTED
    assert record.reason.startswith("crash loop: entered downloading")
    assert outcome(record) is CommandState.FAILED


def test_a_crash_loop_in_the_rollback_ends_rolled_back() -> None:
    record = run([OK] * 6)
    assert record.state is S.WATCHING
    for _ in range(MAX_ENTRIES + 2):
        record = recover(record)
        if record.final:
            break
    assert record.state is S.ROLLED_BACK
    assert outcome(record) is CommandState.ROLLED_BACK


@given(st.lists(st.sampled_from(["ok", "fail", "cancel", "crash"]), max_size=40))
def test_any_mix_of_events_and_crashes_ends_final_within_bounds(script: list[str]) -> None:
    record = new()
    for action in script:
        if record.final:
            break
        if action == "crash":
            record = recover(record)
            continue
        event = {"ok": OK, "fail": FAIL, "cancel": CANCEL}[action]
        if (record.state, event) in TRANSITIONS:
            record = step(record, event)
    # Keep crashing: the cap guarantees an end.
    for _ in range(len(InstallStage) * (MAX_ENTRIES + 1)):
        if record.final:
            break
        record = recover(record)
    assert record.final
    activated = any(s in ("activated", "watching") for s in record.history)
    if activated:
        assert record.state in (S.COMMITTED, S.ROLLED_BACK)
    assert all(n <= MAX_ENTRIES + 1 for n in record.entries.values())
