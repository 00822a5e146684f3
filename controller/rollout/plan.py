"""Planning a rollout: which devices, in which groups, each with the variant selection picks.

Everything the engine later needs is decided here, once, from the database as it is when the
operator creates the rollout, and written as a DRAFT: the rollout row with the engine's
snapshot, its groups and one deployment row per device. Selection's reasons are kept in the
audit log, so an operator can see why a device got (or did not get) a variant.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import Connection, insert, select

from controller.db.schema import (
    AuditEntry,
    Deployment,
    Device,
    Model,
    ModelVersion,
    Rollout,
    RolloutGroup,
    Variant,
)
from controller.rollout.driver import DriverState, dump_state
from controller.rollout.model import DeviceTarget, RolloutConfig, new_rollout
from edgefleet.contract import BuildMetrics, RuntimeFact, RuntimeRequirement, VariantKind
from edgefleet.hardware import HardwareProfile
from edgefleet.selection import Constraints, VariantCandidate, select_variant


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    """Which devices: all of these that are given (an empty field does not restrict)."""

    device_ids: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()      # key=value, all must match
    profiles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    rollout_id: str
    groups: list[tuple[str, list[DeviceTarget]]]
    reasons: dict[str, str]                       # device -> why it got what it got


def parse_groups(spec: str) -> list[float]:
    """'10,50,100' -> cumulative percentages; the last must be 100."""
    try:
        values = [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise PlanError(f"groups must be comma-separated percentages, got {spec!r}") from None
    if not values or any(not 0 < v <= 100 for v in values) or values != sorted(values):
        raise PlanError(f"groups must be increasing percentages in (0, 100], got {spec!r}")
    if values[-1] != 100:
        raise PlanError(f"the last group must reach 100%, got {values[-1]:g}")
    return values


def next_rollout_id(conn: Connection) -> str:
    ids = conn.execute(select(Rollout.id)).scalars().all()
    numbers = [int(m.group(1)) for i in ids if (m := re.fullmatch(r"ro-(\d+)", i))]
    return f"ro-{max(numbers, default=0) + 1:04d}"


def create_rollout(conn: Connection, *, name: str, model_name: str, version: int,
                   target: Target, groups: Sequence[float], config: RolloutConfig,
                   profiles: dict[str, HardwareProfile], constraints: Constraints,
                   watch_s: float = 60.0, min_accuracy: float | None = None,
                   actor: str = "operator", now: float | None = None) -> Plan:
    now = time.time() if now is None else now
    model_version_id = conn.execute(
        select(ModelVersion.id).join(Model, Model.id == ModelVersion.model_id)
        .where(Model.name == model_name, ModelVersion.version == version)).scalar_one_or_none()
    if model_version_id is None:
        raise PlanError(f"unknown model {model_name} version {version}: see `edgefleet models "
                        "list`")
    variants = list(conn.execute(select(Variant.__table__).where(
        Variant.model_version_id == model_version_id)).mappings())
    if not variants:
        raise PlanError(f"{model_name} v{version} has no variants")
    candidates = [_candidate(v) for v in variants]
    devices = _targeted(conn, target)
    if not devices:
        raise PlanError("the target matches no registered device")
    rollout_id = next_rollout_id(conn)
    reasons: dict[str, str] = {}
    targets: list[DeviceTarget] = []
    for device in devices:
        profile = profiles.get(device["profile"] or "")
        if profile is None:
            why = f"unknown hardware (profile {device['profile']!r})"
            targets.append(DeviceTarget(device_id=device["id"], variant_id=None, reason=why))
            reasons[device["id"]] = why
            continue
        runtimes = msgspec.convert((device["facts"] or {}).get("runtimes", []),
                                   tuple[RuntimeFact, ...])
        selection = select_variant(profile, runtimes, candidates, constraints)
        if selection.chosen is None:
            why = "; ".join(selection.reasons + tuple(
                f"{r.variant.variant_id}: {r.reason}" for r in selection.rejected))
            targets.append(DeviceTarget(device_id=device["id"], variant_id=None, reason=why))
        else:
            why = "; ".join(selection.reasons)
            targets.append(DeviceTarget(device_id=device["id"],
                                        variant_id=selection.chosen.variant.variant_id))
        reasons[device["id"]] = why
    deployable = [t for t in targets if t.variant_id is not None]
    if not deployable:
        raise PlanError(f"no targeted device can run {model_name} v{version}: "
                        + "; ".join(f"{device}: {why}" for device, why in reasons.items()))
    # Percentages, and so the canary, count the devices that will get the model; the skipped
    # ones (no variant fits) still get their row, in the last group, where they change nothing.
    planned = _split(deployable, groups)
    last_name, last = planned[-1]
    planned[-1] = (last_name, last + [t for t in targets if t.variant_id is None])
    snapshot = new_rollout(rollout_id, model_name, version, config, planned)
    conn.execute(insert(Rollout).values(
        id=rollout_id, name=name, model_version_id=model_version_id, state="draft",
        target=msgspec.to_builtins(target), created_at=now,
        config={"engine": msgspec.to_builtins(config), "watch_s": watch_s,
                "min_accuracy": min_accuracy, "groups": list(groups)},
        engine_state=dump_state(DriverState(snapshot=snapshot))))
    for group in snapshot.groups:
        conn.execute(insert(RolloutGroup).values(rollout_id=rollout_id, position=group.index,
                                                 name=group.name, state=group.state.value))
        for device in group.devices.values():
            conn.execute(insert(Deployment).values(
                rollout_id=rollout_id, group_position=group.index, device_id=device.device_id,
                variant_id=int(device.variant_id) if device.variant_id else None,
                state=device.state.value, reason=device.reason, updated_at=now))
    conn.execute(insert(AuditEntry).values(
        ts=now, actor=actor, action="rollout.create", subject=rollout_id,
        detail={"model": model_name, "version": version, "groups": list(groups),
                "devices": len(targets), "selection": reasons}))
    return Plan(rollout_id, planned, reasons)


def _candidate(v: Any) -> VariantCandidate:
    return VariantCandidate(
        variant_id=str(v["id"]), kind=VariantKind(v["kind"]),
        runtime=msgspec.convert(v["runtime"], RuntimeRequirement), size_bytes=v["size_bytes"],
        metrics=BuildMetrics(accuracy=v["accuracy"], agreement=v["agreement"],
                             latency_p50_ms=v["latency_p50_ms"],
                             latency_p95_ms=v["latency_p95_ms"]))


def _targeted(conn: Connection, target: Target) -> list[Any]:
    rows = list(conn.execute(select(Device.__table__).order_by(Device.id)).mappings())
    # Unknown means not registered; a registered device the other fields leave out is not.
    missing = set(target.device_ids) - {r["id"] for r in rows}
    if missing:
        raise PlanError(f"unknown devices: {', '.join(sorted(missing))}: see `edgefleet "
                        "devices list`")
    chosen = []
    for row in rows:
        if target.device_ids and row["id"] not in target.device_ids:
            continue
        if target.profiles and row["profile"] not in target.profiles:
            continue
        labels = row["labels"] or {}
        if any(labels.get(k) != v for k, v in target.labels):
            continue
        chosen.append(row)
    left_out = set(target.device_ids) - {r["id"] for r in chosen}
    if left_out:
        raise PlanError(f"devices {', '.join(sorted(left_out))} do not match the profiles or "
                        "labels given with them")
    return chosen


def _split(targets: list[DeviceTarget], groups: Sequence[float]
           ) -> list[tuple[str, list[DeviceTarget]]]:
    """Cumulative percentages over the targeted devices, rounded to the nearest device; each
    group gets at least one device when there are enough, so '1,100' on 10 devices gives a
    canary of one."""
    out: list[tuple[str, list[DeviceTarget]]] = []
    taken = 0
    for index, percent in enumerate(groups):
        upto = max(taken + (1 if taken < len(targets) else 0),
                   math.floor(len(targets) * percent / 100 + 0.5))
        upto = min(len(targets), upto) if index < len(groups) - 1 else len(targets)
        name = "canary" if index == 0 and len(groups) > 1 else f"group-{index + 1}"
        out.append((name, targets[taken:upto]))
        taken = upto
    return out
