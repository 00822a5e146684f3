"""The first schema: devices, models, variants, rollouts, deployments, telemetry, command
statuses, the audit log, and the fleet_status and rollout_progress views.

A frozen snapshot: it spells out its own column types rather than importing the models, so a
later change to controller/db/schema.py needs a new migration, never an edit here. The view SQL
comes from controller.db.views (its ``_v1`` functions), its one home.

Revision ID: 0001
Revises:
Create Date: 2026-05-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from controller.db.views import create_views_v1, drop_views

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PRIMARY KEY is the rowid
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
INT = sa.BigInteger()
TIME: sa.Double[float] = sa.Double()  # float seconds since the epoch, UTC
REAL: sa.Double[float] = sa.Double()
TEXT = sa.String()


def _id() -> sa.Column[int]:
    return sa.Column("id", ID, nullable=False)


def _req(name: str, type_: sa.types.TypeEngine[Any]) -> sa.Column[Any]:
    return sa.Column(name, type_, nullable=False)


def _opt(name: str, type_: sa.types.TypeEngine[Any]) -> sa.Column[Any]:
    return sa.Column(name, type_, nullable=True)


def _fk(column: str, table: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [target],
                                   name=op.f(f"fk_{table}_{column}_{target.split('.')[0]}"))


def upgrade() -> None:
    op.create_table(
        "devices",
        _req("id", TEXT), _req("labels", JSON), _opt("profile", TEXT),
        _req("hardware_known", sa.Boolean()), _req("facts", JSON), _req("online", sa.Boolean()),
        _req("first_seen", TIME), _opt("last_seen", TIME), _req("agent_version", TEXT),
        _opt("active_model_name", TEXT), _opt("active_model_version", INT),
        _opt("active_variant_kind", TEXT), _opt("active_artifact_id", TEXT),
        _opt("active_execution", TEXT), _opt("active_reported_at", TIME),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")))
    op.create_table(
        "models",
        _id(), _req("name", TEXT), _req("created_at", TIME),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")))
    op.create_table(
        "model_versions",
        _id(), _req("model_id", ID), _req("version", INT), _req("source_sha256", TEXT),
        _req("source_file", TEXT), _req("created_at", TIME),
        _fk("model_id", "model_versions", "models.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("model_id", "version",
                            name=op.f("uq_model_versions_model_id_version")))
    op.create_table(
        "variants",
        _id(), _req("model_version_id", ID), _req("artifact_id", TEXT), _req("kind", TEXT),
        _req("file_format", TEXT), _req("runtime", JSON), _req("sha256", TEXT),
        _req("size_bytes", INT), _req("file", TEXT), _req("accuracy", REAL),
        _opt("agreement", REAL), _opt("latency_p50_ms", REAL), _opt("latency_p95_ms", REAL),
        _opt("params", INT), _opt("macs", INT), _req("measured_on", TEXT),
        _req("measurement", JSON), _req("notes", JSON), _req("built_at", TIME),
        _fk("model_version_id", "variants", "model_versions.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_variants")),
        sa.UniqueConstraint("artifact_id", name=op.f("uq_variants_artifact_id")))
    op.create_index(op.f("ix_variants_model_version_id"), "variants", ["model_version_id"])
    op.create_table(
        "rollouts",
        _req("id", TEXT), _req("name", TEXT), _req("model_version_id", ID), _req("state", TEXT),
        _req("target", JSON), _req("config", JSON), _req("current_group", INT),
        _req("created_at", TIME), _opt("started_at", TIME), _opt("finished_at", TIME),
        _opt("paused_reason", TEXT), _req("engine_state", JSON),
        _fk("model_version_id", "rollouts", "model_versions.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")))
    op.create_index(op.f("ix_rollouts_model_version_id"), "rollouts", ["model_version_id"])
    op.create_table(
        "rollout_groups",
        _id(), _req("rollout_id", TEXT), _req("position", INT), _req("name", TEXT),
        _req("state", TEXT), _opt("started_at", TIME), _opt("soak_until", TIME),
        _opt("finished_at", TIME), _req("gate_results", JSON),
        _fk("rollout_id", "rollout_groups", "rollouts.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_groups")),
        sa.UniqueConstraint("rollout_id", "position",
                            name=op.f("uq_rollout_groups_rollout_id_position")))
    op.create_table(
        "rollout_requests",
        _id(), _req("rollout_id", TEXT), _req("action", TEXT), _req("reason", TEXT),
        _req("created_at", TIME), _opt("processed_at", TIME),
        _fk("rollout_id", "rollout_requests", "rollouts.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_requests")))
    op.create_index(op.f("ix_rollout_requests_rollout_id"), "rollout_requests", ["rollout_id"])
    op.create_table(
        "deployments",
        _id(), _req("rollout_id", TEXT), _req("group_position", INT), _req("device_id", TEXT),
        _opt("variant_id", ID), _opt("command_id", TEXT), _req("state", TEXT),
        _req("attempts", INT), _opt("started_at", TIME), _req("updated_at", TIME),
        _opt("finished_at", TIME), _req("reason", TEXT), _opt("stage", TEXT),
        _opt("previous_artifact_id", TEXT),
        _fk("device_id", "deployments", "devices.id"),
        _fk("rollout_id", "deployments", "rollouts.id"),
        _fk("variant_id", "deployments", "variants.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
        sa.UniqueConstraint("rollout_id", "device_id",
                            name=op.f("uq_deployments_rollout_id_device_id")))
    op.create_index(op.f("ix_deployments_command_id"), "deployments", ["command_id"])
    op.create_index(op.f("ix_deployments_device_id"), "deployments", ["device_id"])
    op.create_index(op.f("ix_deployments_rollout_id_group_position"), "deployments",
                    ["rollout_id", "group_position"])
    op.create_table(
        "telemetry",
        _id(), _req("device_id", TEXT), _req("seq", INT), _req("window_start", TIME),
        _req("window_end", TIME), _opt("model_name", TEXT), _opt("model_version", INT),
        _opt("variant_kind", TEXT), _opt("artifact_id", TEXT), _req("execution", TEXT),
        _req("inferences", INT), _req("errors", INT), _req("throughput_ips", REAL),
        _opt("p50_ms", REAL), _opt("p95_ms", REAL), _opt("p99_ms", REAL), _opt("max_ms", REAL),
        _req("labelled", INT), _opt("accuracy", REAL), _opt("agreement", REAL),
        _opt("cpu_percent", REAL), _opt("rss_mb", REAL), _opt("temperature_c", REAL),
        _req("dropped_windows", INT), _req("received_at", TIME),
        _fk("device_id", "telemetry", "devices.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry")),
        sa.UniqueConstraint("device_id", "seq", name=op.f("uq_telemetry_device_id_seq")))
    op.create_index(op.f("ix_telemetry_device_id_window_end"), "telemetry",
                    ["device_id", "window_end"])
    op.create_table(
        "command_statuses",
        _id(), _req("device_id", TEXT), _req("command_id", TEXT), _req("kind", TEXT),
        _req("state", TEXT), _opt("stage", TEXT), _opt("model_name", TEXT),
        _opt("model_version", INT), _req("reason", TEXT), _req("ts", TIME),
        _req("received_at", TIME),
        _fk("device_id", "command_statuses", "devices.id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_command_statuses")))
    op.create_index(op.f("ix_command_statuses_command_id"), "command_statuses", ["command_id"])
    op.create_table(
        "audit_log",
        _id(), _req("ts", TIME), _req("actor", TEXT), _req("action", TEXT),
        _req("subject", TEXT), _req("detail", JSON),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")))
    op.create_index(op.f("ix_audit_log_subject_ts"), "audit_log", ["subject", "ts"])

    for statement in create_views_v1(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for statement in drop_views():
        op.execute(statement)
    for table in ("audit_log", "command_statuses", "telemetry", "deployments", "rollout_groups",
                  "rollout_requests", "rollouts", "variants", "model_versions", "models",
                  "devices"):
        op.drop_table(table)  # its indexes go with it
