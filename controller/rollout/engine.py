"""The rollout engine: `step(snapshot, event) -> StepResult(snapshot, actions)`, and nothing else.

Theory of operation. A rollout is DRAFT until Start. While it is RUNNING, each Tick (and Start
and Resume, which tick at once) applies the rules in this order, at the event's `now`:

  1. timeouts: an attempt IN_PROGRESS for in_progress_timeout_s (counted from its DeployTo)
     ends TIMED_OUT; a timed-out or failed attempt goes back to PENDING while attempts remain
     (AWS IoT Jobs retries), else the device's failure is final;
  2. abort criteria: once abort_min_devices devices have a final outcome and at least
     abort_failure_percent of them failed, the rollout is ABORTED; devices count once, however
     many attempts they took (AWS IoT Jobs);
  3. the current group, the first not SUCCEEDED: a PENDING group starts (an empty one succeeds
     at once, as in hawkBit); then the error threshold (failed/total > y%: PAUSED) is checked
     before the success threshold (succeeded/total >= x%: SOAKING), as hawkBit does; if success
     can no longer be reached the rollout FAILS; after soak_s the gates decide (gates.py): pass
     -> SUCCEEDED and the next group starts in the same step; fail, or still waiting
     gates.timeout_s after the soak -> on_gate_failure ("pause", or "rollback" the group and
     fail). Rule 3 repeats until nothing moves, so a second Tick at the same `now` does nothing;
  4. starts: PENDING devices of started groups, earliest group first, as many as
     max_starts_per_minute leaves after the DeployTo times in the last 60 s (start_log);
  5. every group SUCCEEDED, no device left to start and none in flight -> SUCCEEDED (so a
     rollout that succeeded has no attempt left running; the timeout bounds the wait).

PAUSED applies rule 1 only: attempts still time out, nothing starts. Resume after an error-
threshold pause acknowledges the group's failures so far (only new ones count against it); after
a gate failure it soaks the group again and re-runs its gates. "rollback" rolls back (or cancels
the install of) the failing group's devices only; groups that passed keep the new model.

DeviceStatus records what a device reported (DEVICE_TRANSITIONS) and decides nothing else; the
next Tick acts on it. A status for another command id than the device's current one, or one the
table does not list, is a duplicate or a late report and changes nothing: statuses arrive at
least once.

The driver's contract. Load the snapshot (with telemetry and build accuracy) in one
transaction, call `step`, save the returned snapshot and the actions (an outbox) in the same
transaction, and publish only after the commit. A DeployTo is emitted exactly when the returned
snapshot holds a device IN_PROGRESS under a command id the input snapshot did not hold (a
PENDING device starting, or an attempt that timed out in this step being retried), and a
RollbackDevice exactly when a device moves to ROLLING_BACK; a controller restarted from the
saved snapshot finds those devices already moved and emits nothing for them again. A step
replayed after a crash before the commit yields the same command ids (CommandRef: rollout,
device, attempt), which the agent deduplicates, so no device is ever deployed twice under
different ids. Actions lost after the commit are republished from the outbox under the same
ids, or, without an outbox, the attempt times out and is retried under the next attempt's id.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import NamedTuple

from msgspec.structs import replace

from controller.rollout import gates as gate_rules
from controller.rollout.events import (
    Abort,
    Action,
    Audit,
    AuditValue,
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
    FINAL_FAILURES,
    DeploymentState,
    DeviceDeployment,
    GroupState,
    OnGateFailure,
    PauseCause,
    RolloutSnapshot,
    RolloutState,
    command_id_for,
)
from edgefleet.contract import CommandState

R, G, D = RolloutState, GroupState, DeploymentState


class Cause(enum.Enum):
    # events
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    TICK = "tick"
    DEVICE_STATUS = "device-status"
    # the engine's own decisions
    ERROR_THRESHOLD = "error-threshold"
    GATE_FAILED = "gate-failed"
    GATE_FAILED_ROLLBACK = "gate-failed-rollback"
    SUCCESS_UNREACHABLE = "success-unreachable"
    ABORT_CRITERIA = "abort-criteria"
    COMPLETED = "completed"


# (rollout state, cause) -> next state. Anything not here raises IllegalEvent.
TRANSITIONS: Mapping[tuple[RolloutState, Cause], RolloutState] = {
    (R.DRAFT, Cause.START): R.RUNNING,
    (R.DRAFT, Cause.ABORT): R.ABORTED,                    # nothing was ever sent
    (R.DRAFT, Cause.TICK): R.DRAFT,                       # the driver may tick every rollout
    (R.RUNNING, Cause.TICK): R.RUNNING,
    (R.RUNNING, Cause.DEVICE_STATUS): R.RUNNING,
    (R.RUNNING, Cause.PAUSE): R.PAUSED,
    (R.RUNNING, Cause.ABORT): R.ABORTED,
    (R.RUNNING, Cause.ERROR_THRESHOLD): R.PAUSED,
    (R.RUNNING, Cause.GATE_FAILED): R.PAUSED,             # on_gate_failure = "pause"
    (R.RUNNING, Cause.GATE_FAILED_ROLLBACK): R.FAILED,    # on_gate_failure = "rollback"
    (R.RUNNING, Cause.SUCCESS_UNREACHABLE): R.FAILED,     # too many final failures for x%
    (R.RUNNING, Cause.ABORT_CRITERIA): R.ABORTED,
    (R.RUNNING, Cause.COMPLETED): R.SUCCEEDED,
    (R.PAUSED, Cause.TICK): R.PAUSED,                     # attempts still time out
    (R.PAUSED, Cause.DEVICE_STATUS): R.PAUSED,
    (R.PAUSED, Cause.RESUME): R.RUNNING,
    (R.PAUSED, Cause.ABORT): R.ABORTED,
    # Devices still in flight keep reporting after the end; their statuses are recorded.
    (R.SUCCEEDED, Cause.TICK): R.SUCCEEDED,
    (R.SUCCEEDED, Cause.DEVICE_STATUS): R.SUCCEEDED,
    (R.ABORTED, Cause.TICK): R.ABORTED,
    (R.ABORTED, Cause.DEVICE_STATUS): R.ABORTED,
    (R.FAILED, Cause.TICK): R.FAILED,
    (R.FAILED, Cause.DEVICE_STATUS): R.FAILED,
}

FINAL = frozenset({R.SUCCEEDED, R.ABORTED, R.FAILED})

# Python 3.11 looks enum members up slowly; the per-device loops use these instead.
_PENDING, _IN_PROGRESS, _SUCCEEDED, _SKIPPED = D.PENDING, D.IN_PROGRESS, D.SUCCEEDED, D.SKIPPED
_FAILED, _TIMED_OUT, _REJECTED = D.FAILED, D.TIMED_OUT, D.REJECTED


class GroupCause(enum.Enum):
    START = "start"
    EMPTY = "empty"
    SUCCESS_THRESHOLD = "success-threshold"
    UNREACHABLE = "unreachable"
    GATES_PASSED = "gates-passed"
    GATES_FAILED = "gates-failed"
    RESOAK = "resoak"
    CANCEL = "cancel"


# (group state, cause) -> next state. The engine only asks for these; anything else is a bug.
GROUP_TRANSITIONS: Mapping[tuple[GroupState, GroupCause], GroupState] = {
    (G.PENDING, GroupCause.START): G.RUNNING,
    (G.PENDING, GroupCause.EMPTY): G.SUCCEEDED,           # hawkBit: an empty group succeeds
    (G.RUNNING, GroupCause.SUCCESS_THRESHOLD): G.SOAKING,
    (G.RUNNING, GroupCause.UNREACHABLE): G.FAILED,
    (G.SOAKING, GroupCause.GATES_PASSED): G.SUCCEEDED,    # also after the soak with no gates
    (G.SOAKING, GroupCause.GATES_FAILED): G.FAILED,       # failed, or waited past the timeout
    (G.FAILED, GroupCause.RESOAK): G.SOAKING,             # Resume: a new soak, gates again
    (G.PENDING, GroupCause.CANCEL): G.CANCELLED,
    (G.RUNNING, GroupCause.CANCEL): G.CANCELLED,
    (G.SOAKING, GroupCause.CANCEL): G.CANCELLED,
}

# (device state, reported command state) -> next device state, for the current command only.
DEVICE_TRANSITIONS: Mapping[tuple[DeploymentState, CommandState], DeploymentState] = {
    (D.IN_PROGRESS, CommandState.ACCEPTED): D.IN_PROGRESS,
    (D.IN_PROGRESS, CommandState.IN_PROGRESS): D.IN_PROGRESS,
    (D.IN_PROGRESS, CommandState.SUCCEEDED): D.SUCCEEDED,
    (D.IN_PROGRESS, CommandState.FAILED): D.FAILED,          # retried while attempts remain
    (D.IN_PROGRESS, CommandState.ROLLED_BACK): D.FAILED,     # the agent's watch undid it
    (D.IN_PROGRESS, CommandState.REJECTED): D.REJECTED,      # bad manifest: a retry cannot help
    (D.ROLLING_BACK, CommandState.ACCEPTED): D.ROLLING_BACK,
    (D.ROLLING_BACK, CommandState.IN_PROGRESS): D.ROLLING_BACK,
    (D.ROLLING_BACK, CommandState.SUCCEEDED): D.ROLLED_BACK,
    (D.ROLLING_BACK, CommandState.FAILED): D.ROLLBACK_FAILED,
    (D.ROLLING_BACK, CommandState.REJECTED): D.ROLLBACK_FAILED,
}


_CAUSE: Mapping[type, Cause] = {Tick: Cause.TICK, Start: Cause.START, Pause: Cause.PAUSE,
                                Resume: Cause.RESUME, Abort: Cause.ABORT,
                                DeviceStatus: Cause.DEVICE_STATUS}


class StepResult(NamedTuple):
    snapshot: RolloutSnapshot
    actions: tuple[Action, ...]


class IllegalEvent(RuntimeError):
    """The event is not allowed in the rollout's state (the caller's mistake); nothing changed."""

    def __init__(self, state: RolloutState, cause: Cause) -> None:
        super().__init__(f"no transition from {state.value} on {cause.value}")
        self.state = state
        self.cause = cause


# --- step --------------------------------------------------------------------------------------

def step(snapshot: RolloutSnapshot, event: Event) -> StepResult:
    """The rollout after `event`, and what to do about it; raises IllegalEvent otherwise."""
    cause = _CAUSE[type(event)]
    if (snapshot.state, cause) not in TRANSITIONS:
        raise IllegalEvent(snapshot.state, cause)
    if isinstance(event, DeviceStatus):
        return _device_status(snapshot, event)
    w = _Work(snapshot, event.now)
    if isinstance(event, Start):
        w.move(Cause.START)
        w.started_at = w.now
        w.audit(Decision.ROLLOUT_STARTED, None, devices=sum(len(g.devices)
                                                           for g in snapshot.groups))
        _advance(w)
    elif isinstance(event, Pause):
        w.move(Cause.PAUSE)
        w.paused_by, w.reason = PauseCause.OPERATOR, event.reason
        w.audit(Decision.ROLLOUT_PAUSED, None, cause=PauseCause.OPERATOR.value,
                reason=event.reason)
    elif isinstance(event, Resume):
        _resume(w)
        _advance(w)
    elif isinstance(event, Abort):
        w.audit(Decision.ROLLOUT_ABORTED, None, reason=event.reason, was=snapshot.state.value)
        _close(w, Cause.ABORT, event.reason or "aborted by the operator")
    else:
        w.move(Cause.TICK)
        if w.state in (R.RUNNING, R.PAUSED):
            _advance(w)
    return w.finish()


class _Tally:
    """One group's devices counted by state, from one pass; `pending` in start order."""

    __slots__ = ("failed", "in_progress", "pending", "succeeded", "total")

    def __init__(self, total: int, succeeded: int, failed: int, in_progress: int,
                 pending: list[DeviceDeployment]) -> None:
        self.total = total                  # every device but the skipped ones
        self.succeeded = succeeded
        self.failed = failed                # final failures
        self.in_progress = in_progress
        self.pending = pending


class _Work:
    """The step's working copy: group device maps are copied on first write."""

    def __init__(self, snapshot: RolloutSnapshot, now: float) -> None:
        self.snapshot = snapshot
        self.now = now
        self.config = snapshot.config
        self.state = snapshot.state
        self.paused_by = snapshot.paused_by
        self.reason = snapshot.reason
        self.started_at = snapshot.started_at
        self.finished_at = snapshot.finished_at
        self.start_log = snapshot.start_log
        self.groups = list(snapshot.groups)
        self.edits: dict[int, dict[str, DeviceDeployment]] = {}
        self.actions: list[Action] = []

    def devices(self, g: int) -> Mapping[str, DeviceDeployment]:
        edited = self.edits.get(g)
        return self.groups[g].devices if edited is None else edited

    def put(self, g: int, device: DeviceDeployment) -> None:
        edited = self.edits.get(g)
        if edited is None:
            edited = self.edits[g] = dict(self.groups[g].devices)
        edited[device.device_id] = device

    def move(self, cause: Cause) -> None:
        target = TRANSITIONS.get((self.state, cause))
        if target is None:
            raise IllegalEvent(self.state, cause)
        self.state = target

    def move_group(self, g: int, cause: GroupCause, **changes: object) -> None:
        group = self.groups[g]
        target = GROUP_TRANSITIONS.get((group.state, cause))
        if target is None:
            raise AssertionError(f"group {g}: no transition from {group.state.value} on "
                                 f"{cause.value}")
        self.groups[g] = replace(group, state=target, **changes)

    def audit(self, decision: Decision, group: int | None, **details: AuditValue) -> None:
        self.actions.append(Audit(rollout_id=self.snapshot.rollout_id, at=self.now,
                                  decision=decision, group=group, details=details))

    def finish(self) -> StepResult:
        groups = tuple(replace(group, devices=self.edits[i]) if i in self.edits else group
                       for i, group in enumerate(self.groups))
        snapshot = replace(self.snapshot, state=self.state, groups=groups,
                           paused_by=self.paused_by, reason=self.reason,
                           started_at=self.started_at, finished_at=self.finished_at,
                           start_log=self.start_log)
        return StepResult(snapshot, tuple(self.actions))


def _advance(w: _Work) -> None:
    """Rules 1-5 of the theory of operation, at w.now."""
    tallies = {g: _scan(w, g) for g, group in enumerate(w.groups)
               if group.state is not G.PENDING and group.state is not G.CANCELLED}
    if w.state is not R.RUNNING:
        return
    if _abort_criteria(w, tallies) or not _current_group(w, tallies):
        return
    started = _start_devices(w, tallies)
    in_flight = started + sum(t.in_progress for t in tallies.values())
    waiting = sum(len(t.pending) for t in tallies.values()) - started
    if in_flight == waiting == 0 and all(group.state is G.SUCCEEDED for group in w.groups):
        w.move(Cause.COMPLETED)
        w.finished_at = w.now
        w.audit(Decision.ROLLOUT_SUCCEEDED, None, groups=len(w.groups))


def _scan(w: _Work, g: int) -> _Tally:
    """Counts one group's devices in one pass, ending attempts that ran out of time."""
    timeout = w.config.in_progress_timeout_s
    deadline = w.now - timeout if timeout is not None else -math.inf
    skipped = succeeded = failed = in_progress = 0
    pending: list[DeviceDeployment] = []
    devices = w.devices(g)
    # Enum members bound to locals: this loop runs once per device per tick.
    IN_PROGRESS, PENDING, SUCCEEDED, SKIPPED = _IN_PROGRESS, _PENDING, _SUCCEEDED, _SKIPPED
    FAILED, TIMED_OUT, REJECTED = _FAILED, _TIMED_OUT, _REJECTED
    for d in devices.values():
        s = d.state
        if s is SUCCEEDED:
            succeeded += 1
        elif s is PENDING:
            pending.append(d)
        elif s is IN_PROGRESS:
            started_at = d.started_at
            if started_at is not None and started_at <= deadline:
                d = _end_attempt(w, g, d, TIMED_OUT,
                                 f"attempt {d.attempts} in progress for over {timeout:g} s")
                if d.state is PENDING:
                    pending.append(d)
                else:
                    failed += 1
            else:
                in_progress += 1
        elif s is SKIPPED:
            skipped += 1
        elif s is FAILED or s is TIMED_OUT or s is REJECTED:
            failed += 1
    return _Tally(len(devices) - skipped, succeeded, failed, in_progress, pending)


def _end_attempt(w: _Work, g: int, d: DeviceDeployment, outcome: DeploymentState,
                 reason: str) -> DeviceDeployment:
    """A failed or timed-out attempt: back to PENDING while attempts remain and the rollout can
    still start devices, else a final failure."""
    retry = d.attempts < w.config.max_attempts and w.state in (R.RUNNING, R.PAUSED)
    ended = replace(d, state=D.PENDING if retry else outcome, updated_at=w.now,
                    finished_at=None if retry else w.now, reason=reason)
    w.put(g, ended)
    decision = (Decision.DEVICE_TIMED_OUT if outcome is D.TIMED_OUT
                else Decision.DEVICE_ATTEMPT_FAILED)
    w.audit(decision, g, device_id=d.device_id, command_id=d.command_id, attempt=d.attempts,
            max_attempts=w.config.max_attempts, retry=retry, started_at=d.started_at,
            timeout_s=w.config.in_progress_timeout_s, reason=reason)
    return ended


def _abort_criteria(w: _Work, tallies: Mapping[int, _Tally]) -> bool:
    percent = w.config.abort_failure_percent
    if percent is None:
        return False
    failed = sum(t.failed for t in tallies.values())
    executed = failed + sum(t.succeeded for t in tallies.values())
    if executed < w.config.abort_min_devices or failed * 100 < percent * executed:
        return False
    w.audit(Decision.ABORT_CRITERIA_MET, None, failed_devices=failed, executed_devices=executed,
            failed_percent=100 * failed / executed, threshold_percent=percent,
            min_devices=w.config.abort_min_devices)
    _close(w, Cause.ABORT_CRITERIA,
           f"{failed} of {executed} devices failed (abort at {percent:g}%)")
    return True


def _current_group(w: _Work, tallies: dict[int, _Tally]) -> bool:
    """Rule 3, until nothing moves. False when the rollout stopped running."""
    cfg = w.config
    while True:
        g = next((i for i, group in enumerate(w.groups) if group.state is not G.SUCCEEDED), None)
        if g is None:
            return True
        group = w.groups[g]
        if group.state is G.PENDING:
            tally = tallies[g] = _scan(w, g)
            if tally.total == 0:
                w.move_group(g, GroupCause.EMPTY, started_at=w.now, finished_at=w.now)
                w.audit(Decision.GROUP_EMPTY, g, devices=len(group.devices), total=0)
            else:
                w.move_group(g, GroupCause.START, started_at=w.now)
                w.audit(Decision.GROUP_STARTED, g, total=tally.total,
                        skipped=len(group.devices) - tally.total)
            continue
        if group.state is not G.RUNNING and group.state is not G.SOAKING:
            return True                     # FAILED under a pause is handled by Resume
        tally = tallies[g]
        total, failed = tally.total, tally.failed
        counted = failed - group.acknowledged_failures
        if counted * 100 > cfg.error_threshold_percent * total:
            w.move(Cause.ERROR_THRESHOLD)
            w.paused_by = PauseCause.ERROR_THRESHOLD
            w.reason = (f"group {group.name}: {counted} of {total} devices failed "
                        f"(> {cfg.error_threshold_percent:g}%)")
            w.audit(Decision.ERROR_THRESHOLD_EXCEEDED, g, failed=failed,
                    acknowledged=group.acknowledged_failures, total=total,
                    failed_percent=100 * counted / total,
                    threshold_percent=cfg.error_threshold_percent)
            return False
        if group.state is G.RUNNING:
            if tally.succeeded * 100 >= cfg.success_threshold_percent * total:
                w.move_group(g, GroupCause.SUCCESS_THRESHOLD, soak_started_at=w.now)
                w.audit(Decision.SUCCESS_THRESHOLD_REACHED, g, succeeded=tally.succeeded,
                        total=total, succeeded_percent=100 * tally.succeeded / total,
                        threshold_percent=cfg.success_threshold_percent, soak_s=cfg.soak_s)
                continue
            if (total - failed) * 100 < cfg.success_threshold_percent * total:
                reason = (f"group {group.name}: {failed} of {total} devices failed for good; "
                          f"{cfg.success_threshold_percent:g}% can no longer succeed")
                w.move_group(g, GroupCause.UNREACHABLE, finished_at=w.now, reason=reason)
                w.audit(Decision.SUCCESS_UNREACHABLE, g, failed=failed, total=total,
                        threshold_percent=cfg.success_threshold_percent)
                _close(w, Cause.SUCCESS_UNREACHABLE, reason)
                return False
            return True
        if not _soaked(w, g, tally):
            return w.state is R.RUNNING


def _soaked(w: _Work, g: int, tally: _Tally) -> bool:
    """A SOAKING group after its soak: True when the gates passed and the group SUCCEEDED."""
    cfg, group = w.config, w.groups[g]
    soak_start = group.soak_started_at
    soak_end = (w.now if soak_start is None else soak_start) + cfg.soak_s
    if w.now < soak_end:
        return False
    details: dict[str, AuditValue] = {"succeeded": tally.succeeded, "total": tally.total,
                                      "soak_s": cfg.soak_s}
    verdict = gate_rules.Verdict.PASSED
    results: tuple[gate_rules.GateResult, ...] = ()
    if cfg.gates.any:
        telemetry, build = w.snapshot.telemetry, w.snapshot.build_accuracy
        metrics = gate_rules.collect(w.devices(g).values(), telemetry, build)
        results = gate_rules.evaluate(metrics, cfg.gates)
        verdict = gate_rules.overall(results)
        details["gate_devices"] = metrics.devices
        for r in results:
            details.update({f"{r.name}.verdict": r.verdict.value, f"{r.name}.measured": r.measured,
                            f"{r.name}.threshold": r.threshold, f"{r.name}.samples": r.samples,
                            f"{r.name}.min_samples": r.min_samples, f"{r.name}.detail": r.detail})
    if verdict is gate_rules.Verdict.PASSED:
        w.move_group(g, GroupCause.GATES_PASSED, finished_at=w.now)
        w.audit(Decision.GROUP_SUCCEEDED, g, **details)
        return True
    if verdict is gate_rules.Verdict.WAITING:
        if w.now < soak_end + cfg.gates.timeout_s:
            return False
        decision, why = Decision.GATES_TIMED_OUT, (
            f"gates still short of samples {cfg.gates.timeout_s:g} s after the soak")
    else:
        failed = [r.name for r in results if r.verdict is gate_rules.Verdict.FAILED]
        decision, why = Decision.GATES_FAILED, f"telemetry gate failed: {', '.join(failed)}"
    reason = f"group {group.name}: {why}"
    details["on_gate_failure"] = cfg.on_gate_failure.value
    w.move_group(g, GroupCause.GATES_FAILED, finished_at=w.now, reason=reason)
    w.audit(decision, g, **details)
    if cfg.on_gate_failure is OnGateFailure.PAUSE:
        w.move(Cause.GATE_FAILED)
        w.paused_by, w.reason = PauseCause.GATE_FAILED, reason
    else:
        _roll_back(w, g, reason)
        _close(w, Cause.GATE_FAILED_ROLLBACK, reason)
    return False


def _roll_back(w: _Work, g: int, reason: str) -> None:
    """Rolls back the group's updated devices, and cancels its in-flight installs the same way
    (the agent treats a rollback during an install as a cancel)."""
    rolled = 0
    for d in list(w.devices(g).values()):
        if d.state is D.SUCCEEDED or d.state is D.IN_PROGRESS:
            command_id = command_id_for(w.snapshot.rollout_id, d.device_id, "rollback",
                                        d.attempts)
            w.put(g, replace(d, state=D.ROLLING_BACK, command_id=command_id, updated_at=w.now,
                             finished_at=None, reason=reason))
            w.actions.append(RollbackDevice(rollout_id=w.snapshot.rollout_id, group=g,
                                            device_id=d.device_id, command_id=command_id,
                                            reason=reason))
            rolled += 1
    w.audit(Decision.ROLLBACK_STARTED, g, devices=rolled, reason=reason)


def _close(w: _Work, cause: Cause, reason: str) -> None:
    """Ends the rollout: devices never started and groups not done are cancelled."""
    w.move(cause)
    w.finished_at, w.reason, w.paused_by = w.now, reason, None
    why = f"rollout {w.state.value}: {reason}"
    for g, group in enumerate(w.groups):
        for d in list(w.devices(g).values()):
            if d.state is D.PENDING:
                w.put(g, replace(d, state=D.CANCELLED, updated_at=w.now, finished_at=w.now,
                                 reason=why))
        if (group.state, GroupCause.CANCEL) in GROUP_TRANSITIONS:
            w.move_group(g, GroupCause.CANCEL, finished_at=w.now, reason=why)


def _start_devices(w: _Work, tallies: Mapping[int, _Tally]) -> int:
    """Rule 4: DeployTo for as many PENDING devices as the rate limit allows. Returns how many."""
    limit = w.config.max_starts_per_minute
    recent = tuple(t for t in w.start_log if t > w.now - 60.0)
    capacity = math.inf if limit is None else max(0, limit - len(recent))
    waiting = sum(len(tallies[g].pending) for g in tallies
                  if w.groups[g].state in (G.RUNNING, G.SOAKING, G.SUCCEEDED))
    started = 0
    rollout_id = w.snapshot.rollout_id
    for g in sorted(tallies):
        if started >= capacity:
            break
        if w.groups[g].state not in (G.RUNNING, G.SOAKING, G.SUCCEEDED):
            continue
        for d in tallies[g].pending:
            if started >= capacity:
                break
            attempt = d.attempts + 1
            variant_id = d.variant_id
            assert variant_id is not None, "a PENDING device always has a variant"
            command_id = command_id_for(rollout_id, d.device_id, "deploy", attempt)
            w.put(g, replace(d, state=D.IN_PROGRESS, attempts=attempt, command_id=command_id,
                             started_at=w.now, updated_at=w.now, finished_at=None))
            w.actions.append(DeployTo(rollout_id=rollout_id, group=g, device_id=d.device_id,
                                      variant_id=variant_id, command_id=command_id,
                                      attempt=attempt))
            started += 1
    if limit is not None:
        w.start_log = recent + (w.now,) * started
    if started:
        w.audit(Decision.DEVICES_STARTED, None, started=started, waiting=waiting,
                limit_per_minute=limit, started_last_60s=len(recent))
    return started


def _resume(w: _Work) -> None:
    paused_by = w.paused_by
    w.move(Cause.RESUME)
    details: dict[str, AuditValue] = {"paused_by": paused_by.value if paused_by else None}
    g = next((i for i, group in enumerate(w.groups) if group.state is not G.SUCCEEDED), None)
    if g is not None and paused_by is PauseCause.ERROR_THRESHOLD:
        # The operator has seen these failures and chose to go on: only new ones count now.
        failed = sum(1 for d in w.devices(g).values() if d.state in FINAL_FAILURES)
        w.groups[g] = replace(w.groups[g], acknowledged_failures=failed)
        details["acknowledged_failures"] = failed
    elif g is not None and w.groups[g].state is G.FAILED:
        w.move_group(g, GroupCause.RESOAK, soak_started_at=w.now, finished_at=None, reason="")
        details["resoak_group"] = g
    w.paused_by, w.reason = None, ""
    w.audit(Decision.ROLLOUT_RESUMED, g, **details)


def _device_status(snapshot: RolloutSnapshot, event: DeviceStatus) -> StepResult:
    unchanged = StepResult(snapshot, ())
    g = next((i for i, group in enumerate(snapshot.groups)
              if event.device_id in group.devices), None)
    if g is None:
        return unchanged                      # not a device of this rollout
    d = snapshot.groups[g].devices[event.device_id]
    target = DEVICE_TRANSITIONS.get((d.state, event.state))
    if target is None or not d.command_id or d.command_id != event.command_id:
        return unchanged                      # a duplicate, a late or a stale report
    w = _Work(snapshot, event.now)
    if target is d.state:
        if d.updated_at == event.now:
            return unchanged
        w.put(g, replace(d, updated_at=event.now))
    elif target is D.FAILED:
        _end_attempt(w, g, d, D.FAILED, f"attempt {d.attempts} {event.state.value}: "
                                        f"{event.reason}".rstrip(": "))
    else:
        w.put(g, replace(d, state=target, updated_at=event.now, finished_at=event.now,
                         reason=event.reason))
        if target is D.REJECTED:
            w.audit(Decision.DEVICE_ATTEMPT_FAILED, g, device_id=d.device_id,
                    command_id=d.command_id, attempt=d.attempts,
                    max_attempts=w.config.max_attempts, retry=False, reason=event.reason)
    return w.finish()
