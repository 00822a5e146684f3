"""What the rollout engine takes in (events) and gives out (actions): plain values, so the
driver, the command issuer and the tests speak of them without the engine's rules."""

from __future__ import annotations

import enum
from collections.abc import Mapping

import msgspec

from edgefleet.contract import CommandState

# --- events ------------------------------------------------------------------------------------

class Tick(msgspec.Struct, frozen=True, kw_only=True):
    now: float


class Start(msgspec.Struct, frozen=True, kw_only=True):
    now: float


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    now: float
    reason: str = ""


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    now: float


class Abort(msgspec.Struct, frozen=True, kw_only=True):
    now: float
    reason: str = ""


class DeviceStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A device's command status; `now` is when the controller received it."""

    now: float
    device_id: str
    command_id: str
    state: CommandState
    reason: str = ""


Event = Tick | Start | Pause | Resume | Abort | DeviceStatus

# --- actions -----------------------------------------------------------------------------------

class Decision(enum.Enum):
    ROLLOUT_STARTED = "rollout-started"
    ROLLOUT_PAUSED = "rollout-paused"
    ROLLOUT_RESUMED = "rollout-resumed"
    ROLLOUT_ABORTED = "rollout-aborted"
    ROLLOUT_SUCCEEDED = "rollout-succeeded"
    ABORT_CRITERIA_MET = "abort-criteria-met"
    GROUP_STARTED = "group-started"
    GROUP_EMPTY = "group-empty"
    ERROR_THRESHOLD_EXCEEDED = "error-threshold-exceeded"
    SUCCESS_THRESHOLD_REACHED = "success-threshold-reached"
    SUCCESS_UNREACHABLE = "success-unreachable"
    GROUP_SUCCEEDED = "group-succeeded"
    GATES_FAILED = "gates-failed"
    GATES_TIMED_OUT = "gates-timed-out"
    ROLLBACK_STARTED = "rollback-started"
    DEVICES_STARTED = "devices-started"
    DEVICE_TIMED_OUT = "device-timed-out"
    DEVICE_ATTEMPT_FAILED = "device-attempt-failed"


AuditValue = str | int | float | bool | None


class DeployTo(msgspec.Struct, frozen=True, kw_only=True):
    rollout_id: str
    group: int
    device_id: str
    variant_id: str
    command_id: str
    attempt: int


class RollbackDevice(msgspec.Struct, frozen=True, kw_only=True):
    rollout_id: str
    group: int
    device_id: str
    command_id: str
    reason: str


class Audit(msgspec.Struct, frozen=True, kw_only=True):
    """A decision and the numbers behind it, for the audit log."""

    rollout_id: str
    at: float
    decision: Decision
    group: int | None
    details: Mapping[str, AuditValue]


Action = DeployTo | RollbackDevice | Audit
