"""The SQL views that put fleet status one query away in sqlite3 or psql.

One home for the view SQL: migrations import it from here. The SQL is portable except for how a
float epoch time is shown, which `readable_time` picks by dialect. A migration that changes a
view adds the new SQL here under a new name and leaves the old one for the old migration.

How rollout_progress counts deployments, by `deployments.state` (the values of CommandState
where they overlap): 'succeeded'; failed = 'failed', 'rolled-back' or 'rejected'; 'timed-out';
cancelled = 'cancelled' or 'skipped'; every other state counts as pending.
"""

from __future__ import annotations

from collections.abc import Callable

# What rollout_progress counts as what. The view is built from these when it is created, so a
# change here needs a migration that re-creates it (and the old migration keeps the old SQL).
DEPLOYMENT_SUCCEEDED = ("succeeded",)
DEPLOYMENT_FAILED = ("failed", "rolled-back", "rejected")
DEPLOYMENT_TIMED_OUT = ("timed-out",)
DEPLOYMENT_CANCELLED = ("cancelled", "skipped")
_FINISHED = (DEPLOYMENT_SUCCEEDED + DEPLOYMENT_FAILED + DEPLOYMENT_TIMED_OUT
             + DEPLOYMENT_CANCELLED)

VIEW_NAMES = ("fleet_status", "rollout_progress")


def readable_time(dialect: str) -> Callable[[str], str]:
    """SQL that shows a float epoch column as a time: UTC text in SQLite, timestamptz in PG."""
    if dialect == "sqlite":
        return lambda column: f"datetime({column}, 'unixepoch')"
    return lambda column: f"to_timestamp({column})"


def _in(states: tuple[str, ...]) -> str:
    return ", ".join(f"'{s}'" for s in states)


def fleet_status_v1(dialect: str) -> str:
    """One row per device: what runs there, how it does lately, where its rollout stands."""
    at = readable_time(dialect)
    return f"""CREATE VIEW fleet_status AS
SELECT d.id AS device_id,
       d.profile,
       d.hardware_known,
       d.online,
       {at('d.last_seen')} AS last_seen,
       d.active_model_name AS model_name,
       d.active_model_version AS model_version,
       d.active_variant_kind AS variant_kind,
       d.active_artifact_id AS artifact_id,
       d.active_execution AS execution,
       t.p95_ms,
       t.accuracy,
       {at('t.window_end')} AS telemetry_at,
       dep.rollout_id,
       dep.state AS deployment_state,
       dep.reason AS deployment_reason
FROM devices d
LEFT JOIN telemetry t ON t.id = (
    SELECT t2.id FROM telemetry t2 WHERE t2.device_id = d.id
    ORDER BY t2.window_end DESC, t2.seq DESC LIMIT 1)
LEFT JOIN deployments dep ON dep.id = (
    SELECT d2.id FROM deployments d2 WHERE d2.device_id = d.id
    ORDER BY d2.updated_at DESC, d2.id DESC LIMIT 1)"""


def rollout_progress_v1(dialect: str) -> str:
    """One row per rollout and group: deployments counted by outcome, and the gate results."""
    at = readable_time(dialect)
    return f"""CREATE VIEW rollout_progress AS
SELECT r.id AS rollout_id,
       r.name AS rollout_name,
       r.state AS rollout_state,
       g.position AS group_position,
       g.name AS group_name,
       g.state AS group_state,
       COALESCE(c.targeted, 0) AS targeted,
       COALESCE(c.succeeded, 0) AS succeeded,
       COALESCE(c.failed, 0) AS failed,
       COALESCE(c.timed_out, 0) AS timed_out,
       COALESCE(c.cancelled, 0) AS cancelled,
       COALESCE(c.pending, 0) AS pending,
       g.gate_results,
       {at('g.started_at')} AS started_at,
       {at('g.soak_until')} AS soak_until,
       {at('g.finished_at')} AS finished_at
FROM rollouts r
JOIN rollout_groups g ON g.rollout_id = r.id
LEFT JOIN (
    SELECT rollout_id, group_position,
           COUNT(*) AS targeted,
           SUM(CASE WHEN state IN ({_in(DEPLOYMENT_SUCCEEDED)}) THEN 1 ELSE 0 END) AS succeeded,
           SUM(CASE WHEN state IN ({_in(DEPLOYMENT_FAILED)}) THEN 1 ELSE 0 END) AS failed,
           SUM(CASE WHEN state IN ({_in(DEPLOYMENT_TIMED_OUT)}) THEN 1 ELSE 0 END) AS timed_out,
           SUM(CASE WHEN state IN ({_in(DEPLOYMENT_CANCELLED)}) THEN 1 ELSE 0 END) AS cancelled,
           SUM(CASE WHEN state IN ({_in(_FINISHED)}) THEN 0 ELSE 1 END) AS pending
    FROM deployments
    GROUP BY rollout_id, group_position
) c ON c.rollout_id = g.rollout_id AND c.group_position = g.position"""


def create_views_v1(dialect: str) -> list[str]:
    return [fleet_status_v1(dialect), rollout_progress_v1(dialect)]


def drop_views() -> list[str]:
    return [f"DROP VIEW IF EXISTS {name}" for name in reversed(VIEW_NAMES)]
