"""The install state machine: pure transition logic, no I/O.

Theory of operation. An install moves through

    received -> verified -> downloading -> staged -> smoke-tested -> activated -> watching
             -> committed

Each state has one action, run by agent.install.runner after the state is persisted; the
action's result is an event (OK, FAILED or CANCELLED) that `step` turns into the next state.
Before activation nothing the device runs has changed, so a failure ends in REJECTED; from
activation on a failure goes through ROLLING_BACK (restore the previous model) to ROLLED_BACK.

At start-up `recover` maps the persisted state through RECOVERY: states whose action is safe
to repeat resume; any state not listed resumes as a rollback, because a crash after activation
may be the new model's fault (mender's LoadStateFromDb does the same). Each entry into a state
is counted, and a state entered more than MAX_ENTRIES times ends the install, so a crash loop
stops.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import msgspec

from edgefleet.contract import CommandState, InstallStage

S = InstallStage


class Event(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"     # a rollback command, or a newer deploy, arrived meanwhile


# (state, event) -> next state. Anything not here is illegal and raises.
TRANSITIONS: Mapping[tuple[InstallStage, Event], InstallStage] = {
    (S.RECEIVED, Event.OK): S.VERIFIED,
    (S.RECEIVED, Event.FAILED): S.REJECTED,          # bad signature, expired, replayed, too big
    (S.RECEIVED, Event.CANCELLED): S.REJECTED,
    (S.VERIFIED, Event.OK): S.DOWNLOADING,
    (S.VERIFIED, Event.FAILED): S.REJECTED,
    (S.VERIFIED, Event.CANCELLED): S.REJECTED,
    (S.DOWNLOADING, Event.OK): S.STAGED,             # sha256 of the whole file checked
    (S.DOWNLOADING, Event.FAILED): S.REJECTED,
    (S.DOWNLOADING, Event.CANCELLED): S.REJECTED,
    (S.STAGED, Event.OK): S.SMOKE_TESTED,
    (S.STAGED, Event.FAILED): S.REJECTED,            # does not load, NaN, too slow, inaccurate
    (S.STAGED, Event.CANCELLED): S.REJECTED,
    (S.SMOKE_TESTED, Event.OK): S.ACTIVATED,         # the current pointer now names it
    (S.SMOKE_TESTED, Event.FAILED): S.ROLLING_BACK,  # the pointer switch may have happened
    (S.SMOKE_TESTED, Event.CANCELLED): S.ROLLING_BACK,
    (S.ACTIVATED, Event.OK): S.WATCHING,
    (S.ACTIVATED, Event.FAILED): S.ROLLING_BACK,
    (S.ACTIVATED, Event.CANCELLED): S.ROLLING_BACK,
    (S.WATCHING, Event.OK): S.COMMITTED,             # healthy for the whole watch window
    (S.WATCHING, Event.FAILED): S.ROLLING_BACK,      # errors, NaN, slow, inaccurate
    (S.WATCHING, Event.CANCELLED): S.ROLLING_BACK,
    (S.ROLLING_BACK, Event.OK): S.ROLLED_BACK,
    # The pointer is restored first; if the previous model then fails to load, that is
    # reported, but there is nothing older to go back to.
    (S.ROLLING_BACK, Event.FAILED): S.ROLLED_BACK,
}

FINAL = frozenset({S.COMMITTED, S.ROLLED_BACK, S.REJECTED})

# Persisted state -> where to resume after a restart. Unlisted states resume as a rollback.
RECOVERY: Mapping[InstallStage, InstallStage] = {
    S.RECEIVED: S.RECEIVED,          # verification wrote nothing: verify again
    S.VERIFIED: S.VERIFIED,
    S.DOWNLOADING: S.DOWNLOADING,    # chunks on disk are kept: the download resumes
    S.STAGED: S.STAGED,              # the smoke test reads only the staged file: run it again
    S.ROLLING_BACK: S.ROLLING_BACK,  # restoring the previous pointer is idempotent
    S.COMMITTED: S.COMMITTED,
    S.ROLLED_BACK: S.ROLLED_BACK,
    S.REJECTED: S.REJECTED,
}

MAX_ENTRIES = 3


class IllegalTransition(RuntimeError):
    def __init__(self, state: InstallStage, event: Event) -> None:
        super().__init__(f"no transition from {state.value} on {event.value}")
        self.state = state
        self.event = event


class InstallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One install, as persisted before each action."""

    command_id: str
    command: bytes                    # the deploy command exactly as received (signed manifest)
    model_name: str
    model_version: int
    state: InstallStage = S.RECEIVED
    reason: str = ""                  # why it failed or rolled back
    failed_in: InstallStage | None = None
    entries: dict[str, int] = msgspec.field(default_factory=lambda: {S.RECEIVED.value: 1})
    history: tuple[str, ...] = (S.RECEIVED.value,)
    outcome_reported: bool = False    # the final status is in the outbox

    @property
    def final(self) -> bool:
        return self.state in FINAL


def step(record: InstallRecord, event: Event, reason: str = "") -> InstallRecord:
    """The record after `event` in its current state; raises IllegalTransition otherwise."""
    target = TRANSITIONS.get((record.state, event))
    if target is None:
        raise IllegalTransition(record.state, event)
    failed = event is not Event.OK
    return _enter(record, target,
                  reason=reason if failed else record.reason,
                  failed_in=record.state if failed and record.failed_in is None
                  else record.failed_in)


def recover(record: InstallRecord) -> InstallRecord:
    """Where an install persisted as `record` resumes after a restart."""
    if record.final:
        return record
    resume = RECOVERY.get(record.state, S.ROLLING_BACK)
    reason = record.reason
    failed_in = record.failed_in
    if resume is S.ROLLING_BACK and record.state is not S.ROLLING_BACK:
        reason = reason or f"agent restarted while {record.state.value}"
        failed_in = failed_in or record.state
    if record.entries.get(resume.value, 0) >= MAX_ENTRIES:
        loop = f"crash loop: entered {resume.value} {MAX_ENTRIES} times"
        if resume in (S.ROLLING_BACK,) or _activated(record):
            # Give up on the rollback action itself; start-up falls back to the previous model.
            return _enter(record, S.ROLLED_BACK, reason=reason or loop,
                          failed_in=failed_in or resume)
        return _enter(record, S.REJECTED, reason=loop, failed_in=resume)
    return _enter(record, resume, reason=reason, failed_in=failed_in)


def outcome(record: InstallRecord) -> CommandState:
    """The final report, from what happened (not from which path the code took)."""
    if record.state is S.COMMITTED:
        return CommandState.SUCCEEDED
    if record.state is S.ROLLED_BACK:
        return CommandState.ROLLED_BACK
    if record.state is S.REJECTED:
        return (CommandState.REJECTED if record.failed_in in (S.RECEIVED, S.VERIFIED)
                else CommandState.FAILED)
    return CommandState.IN_PROGRESS


def _activated(record: InstallRecord) -> bool:
    return any(state in (S.ACTIVATED.value, S.WATCHING.value) for state in record.history)


def _enter(record: InstallRecord, state: InstallStage, *, reason: str,
           failed_in: InstallStage | None) -> InstallRecord:
    entries = dict(record.entries)
    entries[state.value] = entries.get(state.value, 0) + 1
    return msgspec.structs.replace(record, state=state, reason=reason, failed_in=failed_in,
                                   entries=entries, history=(*record.history, state.value))
