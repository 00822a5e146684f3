"""`edgefleet rollouts create|start|pause|resume|abort|status`.

Creating a rollout plans it (selection per device) and stores it as a draft. Start, pause,
resume and abort are requests the serving controller applies at its next tick, so the engine
has one driver and every decision lands in the audit log with its numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click
from sqlalchemy import Connection, desc, insert, select, text

from controller.cli.context import home_option, json_option, open_fleet, show
from controller.cli.output import console
from controller.db.schema import AuditEntry, Rollout, RolloutRequest
from controller.rollout.engine import TRANSITIONS, Cause
from controller.rollout.model import Gates, OnGateFailure, RolloutConfig, RolloutState
from controller.rollout.plan import PlanError, Target, create_rollout, parse_groups
from edgefleet.hardware import ProfileError, load_profiles
from edgefleet.selection import Constraints


@click.group()
def rollouts() -> None:
    """Staged rollouts gated on live telemetry."""


@rollouts.command("create")
@home_option
@click.option("--name", required=True)
@click.option("--model", "model_name", required=True)
@click.option("--version", type=int, required=True)
@click.option("--device", "device_ids", multiple=True, help="Target these devices.")
@click.option("--label", "labels", multiple=True, help="Target devices with key=value.")
@click.option("--profile", "profiles", multiple=True, help="Target devices of this profile.")
@click.option("--groups", default="10,50,100", show_default=True,
              help="Cumulative percentages of the targeted devices per group.")
@click.option("--success-threshold", default=100.0, show_default=True,
              help="Percent of a group that must succeed to move on.")
@click.option("--error-threshold", default=0.0, show_default=True,
              help="Percent of a group failed beyond which the rollout pauses.")
@click.option("--max-retries", default=0, show_default=True)
@click.option("--timeout", "timeout_s", type=float, help="Per-device in-progress timeout (s).")
@click.option("--rate", "rate", type=int, help="Devices started per minute at most.")
@click.option("--soak", "soak_s", default=0.0, show_default=True, help="Seconds before gates.")
@click.option("--max-latency-ratio", type=float, help="Gate: new p95 / old p95 at most.")
@click.option("--min-accuracy", type=float, help="Gate: on-device accuracy floor.")
@click.option("--device-min-accuracy", type=float,
              help="Each agent's own floor in its smoke test and watch (it rolls back itself).")
@click.option("--max-accuracy-drop", type=float, help="Gate: points below build accuracy.")
@click.option("--max-error-rate", type=float, help="Gate: error rate at most.")
@click.option("--min-samples", default=100, show_default=True, help="Samples per gate.")
@click.option("--gate-timeout", default=3600.0, show_default=True)
@click.option("--on-gate-failure", type=click.Choice(["pause", "rollback"]), default="pause",
              show_default=True)
@click.option("--watch", "watch_s", default=60.0, show_default=True,
              help="Each device's own health watch before it commits (s).")
@click.option("--min-accuracy-variant", type=float, help="Selection: variant accuracy floor.")
def rollouts_create(home: Path | None, name: str, model_name: str, version: int,
                    device_ids: tuple[str, ...], labels: tuple[str, ...],
                    profiles: tuple[str, ...], groups: str, success_threshold: float,
                    error_threshold: float, max_retries: int, timeout_s: float | None,
                    rate: int | None, soak_s: float, max_latency_ratio: float | None,
                    min_accuracy: float | None, device_min_accuracy: float | None,
                    max_accuracy_drop: float | None,
                    max_error_rate: float | None, min_samples: int, gate_timeout: float,
                    on_gate_failure: str, watch_s: float,
                    min_accuracy_variant: float | None) -> None:
    """Plan a rollout (a draft): targets, groups, and the variant selection picks per device."""
    try:
        label_pairs = tuple(_label(label) for label in labels)
        config = RolloutConfig(
            success_threshold_percent=success_threshold,
            error_threshold_percent=error_threshold, max_retries=max_retries,
            in_progress_timeout_s=timeout_s, max_starts_per_minute=rate, soak_s=soak_s,
            gates=Gates(max_latency_ratio=max_latency_ratio, latency_min_samples=min_samples,
                        min_accuracy=min_accuracy, max_accuracy_drop_points=max_accuracy_drop,
                        accuracy_min_samples=min_samples, max_error_rate=max_error_rate,
                        error_min_samples=min_samples, timeout_s=gate_timeout),
            on_gate_failure=OnGateFailure(on_gate_failure))
        percentages = parse_groups(groups)
        # Not the engine's: these travel to the agents (deploy command) and to selection.
        _within("--device-min-accuracy", device_min_accuracy, 0.0, 1.0)
        _within("--min-accuracy-variant", min_accuracy_variant, 0.0, 1.0)
        _within("--watch", watch_s, 0.0, math.inf)
        if watch_s == 0:  # the command issuer reads 0 as "not set" (60 s)
            raise PlanError("--watch must be greater than 0 seconds")
        hardware = load_profiles()
    except (ValueError, PlanError, ProfileError) as exc:
        raise click.ClickException(str(exc)) from None
    with open_fleet(home) as fleet:
        try:
            with fleet.db.begin() as conn:
                plan = create_rollout(
                    conn, name=name, model_name=model_name, version=version,
                    target=Target(device_ids=device_ids, labels=label_pairs, profiles=profiles),
                    groups=percentages, config=config, profiles=hardware,
                    constraints=Constraints(min_accuracy=min_accuracy_variant),
                    watch_s=watch_s, min_accuracy=device_min_accuracy)
        except (PlanError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    console().print(f"created {plan.rollout_id} ({name}): "
                    + ", ".join(f"{group} {len(devices)}" for group, devices in plan.groups)
                    + f"; start it with `edgefleet rollouts start {plan.rollout_id}`")
    for device_id, why in plan.reasons.items():
        console().print(f"  {device_id}: {why}")


def _within(option: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise PlanError(f"{option} must be within {low:g}..{high:g}, got {value!r}")


def _label(text_: str) -> tuple[str, str]:
    key, sep, value = text_.partition("=")
    if not sep or not key or not value:
        raise PlanError(f"labels are key=value, got {text_!r}")
    return key, value


def _request(home: Path | None, rollout_id: str, action: str, reason: str) -> None:
    with open_fleet(home) as fleet, fleet.db.begin() as conn:
        state = conn.execute(select(Rollout.state).where(Rollout.id == rollout_id)
                             ).scalar_one_or_none()
        if state is None:
            raise click.ClickException(f"unknown rollout {rollout_id!r}: see `edgefleet "
                                       "rollouts status`")
        expected = _after_queued(conn, rollout_id, RolloutState(state))
        if (expected, Cause(action)) not in TRANSITIONS:
            why = f"it is {state}" if expected.value == state else (
                f"it will be {expected.value} once the requests queued before this one apply")
            raise click.ClickException(f"cannot {action} {rollout_id}: {why}")
        now = time.time()
        conn.execute(insert(RolloutRequest).values(rollout_id=rollout_id, action=action,
                                                   reason=reason, created_at=now))
        conn.execute(insert(AuditEntry).values(ts=now, actor="operator",
                                               action=f"rollout.{action}", subject=rollout_id,
                                               detail={"reason": reason}))
    console().print(f"{rollout_id}: {action} requested; `edgefleet serve` applies it at its "
                    "next tick")


def _after_queued(conn: Connection, rollout_id: str, state: RolloutState) -> RolloutState:
    """The state the engine's table gives once the requests not yet applied are, so that the
    request the engine would refuse at its next tick is refused here, where the operator is."""
    for queued in conn.execute(select(RolloutRequest.action).where(
            RolloutRequest.rollout_id == rollout_id, RolloutRequest.processed_at.is_(None))
            .order_by(RolloutRequest.id)).scalars():
        state = TRANSITIONS.get((state, Cause(queued)), state)
    return state


for _action in ("start", "pause", "resume", "abort"):
    def _make(action: str) -> click.Command:
        @click.command(action, help=f"Ask the controller to {action} a rollout.")
        @home_option
        @click.argument("rollout_id")
        @click.option("--reason", default="", help="Recorded in the audit log.")
        def command(home: Path | None, rollout_id: str, reason: str) -> None:
            _request(home, rollout_id, action, reason or f"operator {action}")
        return command
    rollouts.add_command(_make(_action))


@rollouts.command("status")
@home_option
@json_option
@click.argument("rollout_id", required=False)
@click.option("--watch", is_flag=True, help="Refresh until the rollout ends (Ctrl-C stops).")
@click.option("--interval", default=2.0, show_default=True)
def rollouts_status(home: Path | None, as_json: bool, rollout_id: str | None, watch: bool,
                    interval: float) -> None:
    """Progress per rollout and group, from the rollout_progress view."""
    while True:
        with open_fleet(home) as fleet, fleet.db.connect() as conn:
            if rollout_id and not conn.execute(
                    select(Rollout.id).where(Rollout.id == rollout_id)).first():
                raise click.ClickException(f"unknown rollout {rollout_id!r}")
            where = "WHERE rollout_id = :id" if rollout_id else ""
            rows = [dict(r) for r in conn.execute(text(
                f"SELECT * FROM rollout_progress {where} ORDER BY rollout_id, group_position"),
                {"id": rollout_id}).mappings()]
            audits = [dict(r) for r in conn.execute(
                select(AuditEntry.ts, AuditEntry.action, AuditEntry.detail)
                .where(AuditEntry.subject == rollout_id).order_by(desc(AuditEntry.id))
                .limit(5)).mappings()] if rollout_id else []
            state = conn.execute(select(Rollout.state).where(Rollout.id == rollout_id)
                                 ).scalar() if rollout_id else None
        columns = list(rows[0].keys()) if rows else ["rollout_id"]
        show(rows, columns, f"Rollout {rollout_id or 'progress'}"
             + (f": {state}" if state else ""), as_json)
        if audits and not as_json:
            for audit in reversed(audits):
                console().print(f"  {audit['action']}: {audit['detail']}")
        if not watch or state in ("succeeded", "aborted", "failed", None):
            return
        time.sleep(interval)
