"""The rollout snapshot: everything the engine decides from, as frozen values that map to rows.

One RolloutSnapshot is one rollout row (its RolloutConfig and Gates are columns of it), one
GroupSnapshot row per group and one DeviceDeployment row per targeted device. `telemetry` and
`build_accuracy` are inputs, not state: the driver loads them fresh before each step (only the
soaking group's devices need telemetry) and the engine passes them through untouched.

Mappings inside these frozen structs are never mutated; the engine copies one before changing it.
The per-device structs hold only scalars and are built with gc=False: a 100,000-device rollout
would otherwise make every garbage-collector pass walk them all.
"""

from __future__ import annotations

import enum
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import msgspec

from edgefleet.contract.topics import DEVICE_ID_PATTERN

# Short enough that "{rollout}:{device}:deploy:{attempt}" stays under the agent's 128 characters.
ROLLOUT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
_COMMAND_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,39}):([A-Za-z0-9][A-Za-z0-9._-]{0,63})"
                         r":(deploy|rollback):([0-9]{1,9})$")


class RolloutState(enum.Enum):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"            # by the operator or by the abort criteria
    FAILED = "failed"              # a gate failed under "rollback", or success became unreachable


class GroupState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SOAKING = "soaking"            # success threshold reached; waiting out the soak, then gates
    SUCCEEDED = "succeeded"        # gates passed (or none configured): the next group may start
    FAILED = "failed"              # gates failed, timed out, or success became unreachable
    CANCELLED = "cancelled"        # the rollout ended before this group did


class DeploymentState(enum.Enum):
    PENDING = "pending"            # not started yet, or waiting for its next attempt
    IN_PROGRESS = "in-progress"    # a DeployTo was emitted for `command_id`
    SUCCEEDED = "succeeded"
    FAILED = "failed"              # failed (or rolled back on the device) on its last attempt
    TIMED_OUT = "timed-out"        # its last attempt ran past in_progress_timeout_s
    REJECTED = "rejected"          # the device refused the command (never retried)
    SKIPPED = "skipped"            # no variant fits the device: not deployed, not counted
    CANCELLED = "cancelled"        # never started: the rollout ended first
    ROLLING_BACK = "rolling-back"  # a RollbackDevice was emitted for `command_id`
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"


# A device's final failure: it counts once against the error threshold and the abort criteria,
# however many attempts it took.
FINAL_FAILURES = frozenset({DeploymentState.FAILED, DeploymentState.TIMED_OUT,
                            DeploymentState.REJECTED})


class PauseCause(enum.Enum):
    OPERATOR = "operator"
    ERROR_THRESHOLD = "error-threshold"
    GATE_FAILED = "gate-failed"


class OnGateFailure(enum.Enum):
    PAUSE = "pause"                # the group fails, the rollout pauses; Resume soaks it again
    ROLLBACK = "rollback"          # the group's updated devices roll back, the rollout fails


def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _within(name: str, value: float | None, low: float, high: float) -> None:
    if value is None:
        return
    _finite(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be within {low:g}..{high:g}, got {value!r}")


def _positive(name: str, value: float | None) -> None:
    if value is None:
        return
    _finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class Gates(msgspec.Struct, frozen=True, kw_only=True):
    """Telemetry gates checked after a group's soak; a gate left as None is not checked.

    Each gate needs `*_min_samples` samples (new-model inferences; labelled ones for accuracy)
    before it decides: until then it waits. A gate still waiting `timeout_s` after the soak
    ended counts as failed, so a group whose devices never report cannot pass silently.
    """

    max_latency_ratio: float | None = None        # mean p95 new / mean p95 old, same devices
    latency_min_samples: int = 100
    min_accuracy: float | None = None             # floor, as a fraction 0..1
    max_accuracy_drop_points: float | None = None  # build-time accuracy minus live, in points
    accuracy_min_samples: int = 100
    max_error_rate: float | None = None           # errors / inferences, 0..1
    error_min_samples: int = 100
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        _positive("gates.max_latency_ratio", self.max_latency_ratio)
        _within("gates.min_accuracy", self.min_accuracy, 0.0, 1.0)
        _within("gates.max_accuracy_drop_points", self.max_accuracy_drop_points, 0.0, 100.0)
        _within("gates.max_error_rate", self.max_error_rate, 0.0, 1.0)
        _at_least("gates.latency_min_samples", self.latency_min_samples, 1)
        _at_least("gates.accuracy_min_samples", self.accuracy_min_samples, 1)
        _at_least("gates.error_min_samples", self.error_min_samples, 1)
        _positive("gates.timeout_s", self.timeout_s)

    @property
    def any(self) -> bool:
        return any(limit is not None for limit in (
            self.max_latency_ratio, self.min_accuracy, self.max_accuracy_drop_points,
            self.max_error_rate))


class RolloutConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Thresholds, applied to each group in turn; raises ValueError naming a bad field.

    success_threshold_percent: the group may move on once succeeded/total >= this (hawkBit).
    error_threshold_percent: the rollout pauses once failed/total > this (hawkBit); checked first.
    max_retries: a failed or timed-out attempt is retried this many times (AWS IoT Jobs).
    abort_failure_percent / abort_min_devices: the rollout aborts once at least this share of
      the devices with a final outcome failed, after at least that many outcomes (AWS IoT Jobs).
    """

    success_threshold_percent: float = 100.0
    error_threshold_percent: float = 0.0
    max_retries: int = 0
    in_progress_timeout_s: float | None = None
    max_starts_per_minute: int | None = None
    abort_failure_percent: float | None = None
    abort_min_devices: int = 1
    soak_s: float = 0.0
    gates: Gates = msgspec.field(default_factory=Gates)
    on_gate_failure: OnGateFailure = OnGateFailure.PAUSE

    def __post_init__(self) -> None:
        _within("success_threshold_percent", self.success_threshold_percent, 0.0, 100.0)
        _within("error_threshold_percent", self.error_threshold_percent, 0.0, 100.0)
        _at_least("max_retries", self.max_retries, 0)
        _positive("in_progress_timeout_s", self.in_progress_timeout_s)
        if self.max_starts_per_minute is not None:
            _at_least("max_starts_per_minute", self.max_starts_per_minute, 1)
        if self.abort_failure_percent is not None:
            _within("abort_failure_percent", self.abort_failure_percent, 0.0, 100.0)
            if self.abort_failure_percent == 0:
                raise ValueError("abort_failure_percent must be greater than 0 (0 would abort "
                                 "on the first success); leave it None to never abort")
        _at_least("abort_min_devices", self.abort_min_devices, 1)
        _within("soak_s", self.soak_s, 0.0, math.inf)
        if not isinstance(self.on_gate_failure, OnGateFailure):
            raise ValueError(f"on_gate_failure must be one of "
                             f"{[m.value for m in OnGateFailure]}, got {self.on_gate_failure!r}")

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1


class DeviceDeployment(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One device's deployment in one rollout (a row). `command_id` names the latest command
    sent to it (deploy, or rollback once ROLLING_BACK); statuses for any other id are stale."""

    device_id: str
    variant_id: str | None           # None: no variant fits the device (it is SKIPPED)
    state: DeploymentState = DeploymentState.PENDING
    attempts: int = 0                # DeployTo commands sent so far
    command_id: str = ""
    started_at: float | None = None  # when the current attempt's DeployTo was emitted
    updated_at: float | None = None
    finished_at: float | None = None
    reason: str = ""


class GroupSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    devices: Mapping[str, DeviceDeployment]    # device id -> deployment, in start order
    state: GroupState = GroupState.PENDING
    started_at: float | None = None
    soak_started_at: float | None = None       # when the success threshold was reached
    finished_at: float | None = None
    # Final failures the operator accepted by resuming after an error-threshold pause: only
    # failures beyond these count against the error threshold again.
    acknowledged_failures: int = 0
    reason: str = ""


class DeviceMetrics(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One model's numbers on one device, summed over a window of telemetry."""

    inferences: int = 0
    errors: int = 0
    p95_ms: float | None = None
    labelled: int = 0                # inferences that had a label
    correct: int = 0                 # of those, how many the model got right


class GateInputs(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Gate inputs for one device: the previous model's numbers on it, and the new model's since
    it was activated there."""

    before: DeviceMetrics | None = None
    after: DeviceMetrics | None = None


class RolloutSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    rollout_id: str
    model_name: str
    model_version: int
    config: RolloutConfig
    groups: tuple[GroupSnapshot, ...]
    state: RolloutState = RolloutState.DRAFT
    paused_by: PauseCause | None = None
    reason: str = ""                          # why it paused, aborted or failed
    started_at: float | None = None
    finished_at: float | None = None
    start_log: tuple[float, ...] = ()         # DeployTo times within the last minute (rate limit)
    # Inputs loaded by the driver before each step; never saved back.
    telemetry: Mapping[str, GateInputs] = msgspec.field(default_factory=dict)
    build_accuracy: Mapping[str, float] = msgspec.field(default_factory=dict)  # variant -> 0..1


class DeviceTarget(msgspec.Struct, frozen=True, kw_only=True):
    """A device the caller targeted, with the variant selection chose (None: none fits)."""

    device_id: str
    variant_id: str | None
    reason: str = ""                          # why no variant fits, when variant_id is None


def new_rollout(rollout_id: str, model_name: str, model_version: int, config: RolloutConfig,
                groups: Sequence[tuple[str, Sequence[DeviceTarget]]]) -> RolloutSnapshot:
    """A DRAFT rollout over `groups` (name, resolved devices), in rollout order.

    Devices with no fitting variant are SKIPPED: they are left out of every total, so hardware
    that cannot run the model neither pauses a rollout nor counts towards its success.
    """
    if not ROLLOUT_ID_PATTERN.fullmatch(rollout_id):
        raise ValueError(f"rollout_id must match {ROLLOUT_ID_PATTERN.pattern}, got "
                         f"{rollout_id!r}")
    if not groups:
        raise ValueError("a rollout needs at least one group")
    seen: Counter[str] = Counter(t.device_id for _, targets in groups for t in targets)
    twice = sorted(device for device, n in seen.items() if n > 1)
    if twice:
        raise ValueError(f"devices targeted more than once: {', '.join(twice[:5])}")
    bad = sorted(device for device in seen if not DEVICE_ID_PATTERN.fullmatch(device))
    if bad:
        raise ValueError(f"invalid device ids: {', '.join(map(repr, bad[:5]))}")
    built = []
    for index, (name, targets) in enumerate(groups):
        devices = {}
        for target in targets:
            if target.variant_id is None:
                devices[target.device_id] = DeviceDeployment(
                    device_id=target.device_id, variant_id=None, state=DeploymentState.SKIPPED,
                    reason=target.reason or "no variant fits this device")
            else:
                devices[target.device_id] = DeviceDeployment(device_id=target.device_id,
                                                             variant_id=target.variant_id)
        built.append(GroupSnapshot(index=index, name=name, devices=devices))
    return RolloutSnapshot(rollout_id=rollout_id, model_name=model_name,
                           model_version=model_version, config=config, groups=tuple(built))


def command_id_for(rollout_id: str, device_id: str, kind: str, attempt: int) -> str:
    """The command id for a deploy ("deploy") or rollback ("rollback") of one attempt."""
    return f"{rollout_id}:{device_id}:{kind}:{attempt}"


class CommandRef(msgspec.Struct, frozen=True, kw_only=True):
    """What a command id names. Ids are derived, never drawn: the same rollout, device and
    attempt always give the same id, so a replayed step cannot deploy under a second id, and the
    driver routes a device's status to its rollout by parsing the id back."""

    rollout_id: str
    device_id: str
    kind: str                                 # "deploy" or "rollback"
    attempt: int                              # the deploy attempt (a rollback undoes that one)

    @property
    def command_id(self) -> str:
        return command_id_for(self.rollout_id, self.device_id, self.kind, self.attempt)

    @classmethod
    def parse(cls, command_id: str) -> CommandRef | None:
        """The reference inside `command_id`, or None when it is not one of ours."""
        match = _COMMAND_ID.fullmatch(command_id)
        if match is None:
            return None
        rollout_id, device_id, kind, attempt = match.groups()
        return cls(rollout_id=rollout_id, device_id=device_id, kind=kind, attempt=int(attempt))


def group_counts(group: GroupSnapshot) -> Mapping[DeploymentState, int]:
    """How many of the group's devices are in each state (every state present, zeros too)."""
    counts = dict.fromkeys(DeploymentState, 0)
    counts.update(Counter(d.state for d in group.devices.values()))
    return counts
