"""Shared by the rollout engine tests: small rollouts, events and what to read off the result."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from controller.rollout.engine import step
from controller.rollout.events import Action, Audit, Decision, DeployTo, DeviceStatus, Event
from controller.rollout.model import (
    DeploymentState,
    DeviceDeployment,
    DeviceMetrics,
    DeviceTarget,
    GateInputs,
    GroupState,
    RolloutConfig,
    RolloutSnapshot,
    RolloutState,
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
