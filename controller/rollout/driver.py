"""Drives rollouts: loads a snapshot in one transaction, steps the pure engine, saves, and
publishes the resulting commands only after the commit.

What the engine needs besides its own saved snapshot is loaded fresh each tick: operator
requests (rollout_requests), the command statuses devices reported since the last tick (a
cursor in the saved state), live telemetry for groups whose gates are due, and each variant's
build-time accuracy. Commands go through a small outbox kept with the snapshot: written in the
same transaction, published after the commit, cleared after publishing. A controller that dies
in between republishes the same command ids, which agents deduplicate.

On PostgreSQL each rollout is driven under a transaction-level advisory lock, so of several
`edgefleet serve` processes exactly one steps a given rollout at a time; the others skip it.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy import Connection, Engine, func, insert, select, update

from controller.db.schema import (
    AuditEntry,
    CommandStatusRow,
    Deployment,
    Rollout,
    RolloutGroup,
    RolloutRequest,
    Telemetry,
    Variant,
)
from controller.rollout.engine import IllegalEvent, step
from controller.rollout.events import (
    Abort,
    Audit,
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
    DeploymentState,
    DeviceMetrics,
    GateInputs,
    GroupState,
    RolloutSnapshot,
)
from edgefleet.contract import CommandState

log = logging.getLogger(__name__)

Command = DeployTo | RollbackDevice
REQUESTS: dict[str, Callable[[float, str], Event]] = {
    "start": lambda now, reason: Start(now=now),
    "pause": lambda now, reason: Pause(now=now, reason=reason),
    "resume": lambda now, reason: Resume(now=now),
    "abort": lambda now, reason: Abort(now=now, reason=reason),
}
ACTIVE_STATES = ("draft", "running", "paused")
BEFORE_WINDOWS_S = 3600.0          # the previous model's telemetry looked at for the gates


STATUS_OVERLAP_S = 60.0            # statuses re-read each tick; the engine ignores repeats


class DriverState(msgspec.Struct, kw_only=True):
    """What rollouts.engine_state holds."""

    snapshot: RolloutSnapshot
    status_cursor: float = 0.0     # received_at of the newest status fed to the engine
    outbox: list[DeployTo | RollbackDevice] = msgspec.field(default_factory=list)


# Tagged so the outbox decodes back into the right action type.
class _Deploy(DeployTo, frozen=True, kw_only=True, tag="deploy"):
    pass


class _Rollback(RollbackDevice, frozen=True, kw_only=True, tag="rollback"):
    pass


class _Saved(msgspec.Struct, kw_only=True):
    snapshot: RolloutSnapshot
    status_cursor: float = 0.0
    outbox: list[_Deploy | _Rollback] = msgspec.field(default_factory=list)


def load_state(raw: dict[str, Any]) -> DriverState:
    saved = msgspec.convert(raw, _Saved)
    return DriverState(snapshot=saved.snapshot, status_cursor=saved.status_cursor,
                       outbox=[_plain(a) for a in saved.outbox])


def dump_state(state: DriverState) -> dict[str, Any]:
    snapshot = msgspec.structs.replace(state.snapshot, telemetry={}, build_accuracy={})
    outbox = [_Deploy(**msgspec.structs.asdict(a)) if isinstance(a, DeployTo)
              else _Rollback(**msgspec.structs.asdict(a)) for a in state.outbox]
    result: dict[str, Any] = msgspec.to_builtins(
        _Saved(snapshot=snapshot, status_cursor=state.status_cursor, outbox=outbox))
    return result


def _plain(action: _Deploy | _Rollback) -> Command:
    if isinstance(action, _Deploy):
        return DeployTo(**msgspec.structs.asdict(action))
    return RollbackDevice(**msgspec.structs.asdict(action))


@dataclass
class TickReport:
    rollout_id: str
    stepped: bool
    published: int = 0
    state: str = ""
    audits: list[Audit] = field(default_factory=list)


class RolloutDriver:
    def __init__(self, db: Engine, publish: Callable[[Command, dict[str, Any]], bool], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._publish = publish
        self._clock = clock
        self._postgres = db.dialect.name == "postgresql"

    def active_rollouts(self) -> list[str]:
        with self.db.connect() as conn:
            rows = conn.execute(select(Rollout.id).where(Rollout.state.in_(ACTIVE_STATES))
                                .order_by(Rollout.created_at))
            return [r[0] for r in rows]

    def tick_all(self) -> list[TickReport]:
        return [self.tick(rollout_id) for rollout_id in self.active_rollouts()]

    def tick(self, rollout_id: str) -> TickReport:
        now = self._clock()
        with self.db.begin() as conn:
            if self._postgres and not conn.execute(
                    select(func.pg_try_advisory_xact_lock(_lock_key(rollout_id)))).scalar():
                return TickReport(rollout_id, stepped=False)
            raw = conn.execute(select(Rollout.engine_state).where(Rollout.id == rollout_id)
                               .with_for_update()).scalar_one_or_none()
            if raw is None:
                return TickReport(rollout_id, stepped=False)
            state = load_state(raw)
            before = state.snapshot
            events, cursor = self._events(conn, rollout_id, state.status_cursor, now)
            snapshot = self._with_inputs(conn, before)
            report = TickReport(rollout_id, stepped=True)
            for event in [*events, Tick(now=now)]:
                try:
                    result = step(snapshot, event)
                except IllegalEvent as exc:
                    self._audit(conn, rollout_id, now, "request.refused",
                                {"event": type(event).__name__, "why": str(exc)})
                    continue
                snapshot = result.snapshot
                for action in result.actions:
                    if isinstance(action, Audit):
                        report.audits.append(action)
                    else:
                        state.outbox.append(action)
            state = DriverState(snapshot=snapshot, status_cursor=cursor, outbox=state.outbox)
            self._save(conn, rollout_id, before, state, report.audits, now)
            report.state = snapshot.state.value
            outbox = list(state.outbox)
        report.published = self._flush(rollout_id, outbox)
        return report

    # --- inputs ----------------------------------------------------------------------------

    def _events(self, conn: Connection, rollout_id: str, cursor: float, now: float
                ) -> tuple[list[Event], float]:
        events: list[Event] = []
        requests = conn.execute(
            select(RolloutRequest.id, RolloutRequest.action, RolloutRequest.reason)
            .where(RolloutRequest.rollout_id == rollout_id,
                   RolloutRequest.processed_at.is_(None))
            .order_by(RolloutRequest.id)).all()
        for request in requests:
            make = REQUESTS.get(request.action)
            if make is not None:
                events.append(make(now, request.reason))
            conn.execute(update(RolloutRequest).where(RolloutRequest.id == request.id)
                         .values(processed_at=now))
        # Read by arrival time with an overlap, not by id: on PostgreSQL ids can commit out of
        # order, and a status fed twice changes nothing in the engine.
        statuses = conn.execute(
            select(CommandStatusRow.received_at, CommandStatusRow.device_id,
                   CommandStatusRow.command_id, CommandStatusRow.state, CommandStatusRow.reason)
            .where(CommandStatusRow.received_at >= cursor - STATUS_OVERLAP_S,
                   CommandStatusRow.command_id.like(f"{rollout_id}:%"))
            .order_by(CommandStatusRow.received_at, CommandStatusRow.id)).all()
        for status in statuses:
            events.append(DeviceStatus(now=now, device_id=status.device_id,
                                       command_id=status.command_id,
                                       state=CommandState(status.state), reason=status.reason))
            cursor = max(cursor, status.received_at)
        return events, cursor

    def _with_inputs(self, conn: Connection, snapshot: RolloutSnapshot) -> RolloutSnapshot:
        variant_ids = {d.variant_id for g in snapshot.groups for d in g.devices.values()
                       if d.variant_id is not None}
        variants = {str(v.id): v for v in conn.execute(
            select(Variant.id, Variant.accuracy, Variant.artifact_id)
            .where(Variant.id.in_([int(v) for v in variant_ids]))).all()} if variant_ids else {}
        build_accuracy = {vid: v.accuracy for vid, v in variants.items()}
        telemetry: dict[str, GateInputs] = {}
        for group in snapshot.groups:
            if group.state is not GroupState.SOAKING:
                continue
            started = group.started_at or 0.0
            by_artifact: dict[str, list[str]] = {}
            for device in group.devices.values():
                if device.state is DeploymentState.SUCCEEDED and device.variant_id in variants:
                    by_artifact.setdefault(variants[device.variant_id].artifact_id,
                                           []).append(device.device_id)
            for artifact_id, devices in by_artifact.items():
                after = _metrics(conn, devices, Telemetry.artifact_id == artifact_id)
                prior = _metrics(conn, devices, (Telemetry.artifact_id != artifact_id)
                                 & (Telemetry.window_end <= started)
                                 & (Telemetry.window_end >= started - BEFORE_WINDOWS_S))
                for device_id in devices:
                    telemetry[device_id] = GateInputs(before=prior.get(device_id),
                                                      after=after.get(device_id))
        return msgspec.structs.replace(snapshot, telemetry=telemetry,
                                       build_accuracy=build_accuracy)

    # --- saving ----------------------------------------------------------------------------

    def _save(self, conn: Connection, rollout_id: str, before: RolloutSnapshot,
              state: DriverState, audits: Sequence[Audit], now: float) -> None:
        snapshot = state.snapshot
        current = next((g.index for g in snapshot.groups
                        if g.state is not GroupState.SUCCEEDED), len(snapshot.groups))
        conn.execute(update(Rollout).where(Rollout.id == rollout_id).values(
            state=snapshot.state.value, engine_state=dump_state(state), current_group=current,
            started_at=snapshot.started_at, finished_at=snapshot.finished_at,
            paused_reason=snapshot.reason or None))
        for group, old in zip(snapshot.groups, before.groups, strict=True):
            if group != old:
                conn.execute(update(RolloutGroup).where(
                    RolloutGroup.rollout_id == rollout_id,
                    RolloutGroup.position == group.index).values(
                    state=group.state.value, started_at=group.started_at,
                    finished_at=group.finished_at))
            for device_id, device in group.devices.items():
                if old.devices.get(device_id) == device:
                    continue
                conn.execute(update(Deployment).where(
                    Deployment.rollout_id == rollout_id, Deployment.device_id == device_id)
                    .values(state=device.state.value, attempts=device.attempts,
                            command_id=device.command_id or None,
                            started_at=device.started_at, finished_at=device.finished_at,
                            updated_at=now, reason=device.reason))
        for audit in audits:
            details = dict(audit.details)
            self._audit(conn, rollout_id, audit.at, f"engine.{audit.decision.value}",
                        {**details, "group": audit.group})
            if audit.group is not None and any(k.endswith(".verdict") for k in details):
                conn.execute(update(RolloutGroup).where(
                    RolloutGroup.rollout_id == rollout_id,
                    RolloutGroup.position == audit.group).values(gate_results=[details]))

    def _audit(self, conn: Connection, rollout_id: str, at: float, action: str,
               detail: dict[str, Any]) -> None:
        conn.execute(insert(AuditEntry).values(
            ts=at, actor="engine", action=action, subject=rollout_id, detail=detail))

    def _flush(self, rollout_id: str, outbox: list[Command]) -> int:
        """Publishes the outbox after the commit, then removes what went out.

        On PostgreSQL this holds the rollout's advisory lock and publishes the outbox as it
        stands under the lock: another process that stepped the rollout since our commit found
        the same commands in the outbox, and publishing outside the lock sent them twice.
        """
        if not outbox:
            return 0
        if not self._postgres:
            sent = self._send(rollout_id, outbox)
            if sent:
                with self.db.begin() as conn:
                    self._remove(conn, rollout_id, sent)
            return len(sent)
        with self.db.begin() as conn:
            if not conn.execute(select(func.pg_try_advisory_xact_lock(
                    _lock_key(rollout_id)))).scalar():
                return 0             # whoever holds it publishes what is still there
            raw = conn.execute(select(Rollout.engine_state).where(
                Rollout.id == rollout_id).with_for_update()).scalar_one()
            pending = load_state(raw).outbox
            sent = self._send(rollout_id, pending) if pending else []
            if sent:
                self._remove(conn, rollout_id, sent)
        return len(sent)

    def _send(self, rollout_id: str, outbox: list[Command]) -> list[Command]:
        with self.db.connect() as conn:
            config = conn.execute(select(Rollout.config).where(
                Rollout.id == rollout_id)).scalar_one()
        return [a for a in outbox if self._publish(a, config)]

    def _remove(self, conn: Connection, rollout_id: str, sent: list[Command]) -> None:
        raw = conn.execute(select(Rollout.engine_state).where(
            Rollout.id == rollout_id).with_for_update()).scalar_one()
        state = load_state(raw)
        state.outbox = [a for a in state.outbox if a not in sent]
        conn.execute(update(Rollout).where(Rollout.id == rollout_id)
                     .values(engine_state=dump_state(state)))


def _metrics(conn: Connection, device_ids: Iterable[str], condition: Any
             ) -> dict[str, DeviceMetrics]:
    ids = list(device_ids)
    out: dict[str, DeviceMetrics] = {}
    for start in range(0, len(ids), 1000):
        rows = conn.execute(
            select(Telemetry.device_id, func.sum(Telemetry.inferences),
                   func.sum(Telemetry.errors), func.avg(Telemetry.p95_ms),
                   func.sum(Telemetry.labelled),
                   func.sum(func.coalesce(Telemetry.accuracy, 0) * Telemetry.labelled))
            .where(Telemetry.device_id.in_(ids[start:start + 1000]), condition)
            .group_by(Telemetry.device_id)).all()
        for device_id, inferences, errors, p95, labelled, correct in rows:
            out[device_id] = DeviceMetrics(
                inferences=int(inferences or 0), errors=int(errors or 0),
                p95_ms=None if p95 is None else float(p95), labelled=int(labelled or 0),
                correct=round(correct or 0))
    return out


def _lock_key(rollout_id: str) -> int:
    # A stable signed 64-bit key per rollout for pg advisory locks.
    return zlib.crc32(f"edgefleet-rollout:{rollout_id}".encode()) - 2**31

