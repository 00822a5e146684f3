"""The fleet database's tables, as SQLAlchemy 2 declarative models.

Times are float seconds since the epoch (UTC), as on the wire; the views in controller.db.views
render them readable. Every integer is 64-bit (telemetry `seq` starts at the clock in
milliseconds). JSON columns are JSONB on PostgreSQL so operators can query into them.
The migrations in controller/migrations create exactly this; a test compares the two.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSON everywhere; JSONB on PostgreSQL (indexable, `->>` works, equality for GROUP BY).
Json = JSON().with_variant(JSONB(), "postgresql")
# A surrogate key: BIGINT on PostgreSQL, but INTEGER on SQLite, where only an INTEGER PRIMARY KEY
# is the rowid and autoincrements.
Id = BigInteger().with_variant(Integer(), "sqlite")

# Named constraints, so that migrations can refer to them on both backends.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        int: BigInteger(),
        float: Double(),
        str: String(),
        dict[str, Any]: Json,
        dict[str, str]: Json,
        list[Any]: Json,
        list[str]: Json,
    }


class Device(Base):
    """One device, registered when it first speaks. Unknown hardware is flagged, not guessed."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(primary_key=True)
    labels: Mapped[dict[str, str]] = mapped_column(default=dict)
    profile: Mapped[str | None]                        # matched profile name, from facts
    hardware_known: Mapped[bool] = mapped_column(default=False)
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"hardware":..,"runtimes":..}
    online: Mapped[bool] = mapped_column(default=False)
    first_seen: Mapped[float] = mapped_column(default=time.time)
    last_seen: Mapped[float | None]                    # controller clock, last sign of life
    agent_version: Mapped[str] = mapped_column(default="")
    active_model_name: Mapped[str | None]
    active_model_version: Mapped[int | None]
    active_variant_kind: Mapped[str | None]
    active_artifact_id: Mapped[str | None]
    active_execution: Mapped[str | None]
    # Device clock of the report (facts ts or telemetry window end) the active_* columns come
    # from, so a replayed old window or a stale retained facts message never overwrites them.
    active_reported_at: Mapped[float | None]


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[float] = mapped_column(default=time.time)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version: Mapped[int]
    source_sha256: Mapped[str]
    source_file: Mapped[str]
    created_at: Mapped[float] = mapped_column(default=time.time)


class Variant(Base):
    """One built artifact of a model version, with what the variant pipeline measured."""

    __tablename__ = "variants"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    artifact_id: Mapped[str] = mapped_column(unique=True)
    kind: Mapped[str]                                  # VariantKind value
    file_format: Mapped[str]                           # FileFormat value
    runtime: Mapped[dict[str, Any]]                    # RuntimeRequirement as a JSON object
    sha256: Mapped[str]
    size_bytes: Mapped[int]
    file: Mapped[str]                                  # path of the artifact on this machine
    accuracy: Mapped[float]
    agreement: Mapped[float | None]
    latency_p50_ms: Mapped[float | None]
    latency_p95_ms: Mapped[float | None]
    params: Mapped[int | None]
    macs: Mapped[int | None]
    measured_on: Mapped[str] = mapped_column(default="")
    measurement: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the full Measurement
    notes: Mapped[list[str]] = mapped_column(default=list)
    built_at: Mapped[float]


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(primary_key=True)  # "ro-0001"
    name: Mapped[str]
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    state: Mapped[str]
    target: Mapped[dict[str, Any]] = mapped_column(default=dict)   # which devices, by label
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)   # groups, gates, timeouts
    current_group: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[float] = mapped_column(default=time.time)
    started_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    paused_reason: Mapped[str | None]
    engine_state: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the pure engine's own


class RolloutRequest(Base):
    """An operator's start/pause/resume/abort, applied by the serving controller's next tick."""

    __tablename__ = "rollout_requests"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), index=True)
    action: Mapped[str]                                # start, pause, resume, abort
    reason: Mapped[str] = mapped_column(default="")
    created_at: Mapped[float] = mapped_column(default=time.time)
    processed_at: Mapped[float | None]


class RolloutGroup(Base):
    __tablename__ = "rollout_groups"
    __table_args__ = (UniqueConstraint("rollout_id", "position"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    position: Mapped[int]                              # 0, 1, 2...: the order groups go in
    name: Mapped[str]
    state: Mapped[str]
    started_at: Mapped[float | None]
    soak_until: Mapped[float | None]
    finished_at: Mapped[float | None]
    gate_results: Mapped[list[Any]] = mapped_column(default=list)


class Deployment(Base):
    """One device in one rollout: the command sent, where it stands, and why."""

    __tablename__ = "deployments"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id"),
        Index(None, "rollout_id", "group_position"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    group_position: Mapped[int]
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    variant_id: Mapped[int | None] = mapped_column(ForeignKey("variants.id"))
    command_id: Mapped[str | None] = mapped_column(index=True)
    state: Mapped[str]                                 # see views.DEPLOYMENT_* for the counts
    attempts: Mapped[int] = mapped_column(default=0)
    started_at: Mapped[float | None]
    updated_at: Mapped[float] = mapped_column(default=time.time)
    finished_at: Mapped[float | None]
    reason: Mapped[str] = mapped_column(default="")
    stage: Mapped[str | None]                          # InstallStage value last reported
    previous_artifact_id: Mapped[str | None]           # what to roll back to


class Telemetry(Base):
    """One telemetry window. Unique per (device, seq): a redelivered batch is stored once."""

    __tablename__ = "telemetry"
    __table_args__ = (
        UniqueConstraint("device_id", "seq"),
        Index(None, "device_id", "window_end"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    seq: Mapped[int]
    window_start: Mapped[float]
    window_end: Mapped[float]
    model_name: Mapped[str | None]
    model_version: Mapped[int | None]
    variant_kind: Mapped[str | None]
    artifact_id: Mapped[str | None]
    execution: Mapped[str]
    inferences: Mapped[int]
    errors: Mapped[int]
    throughput_ips: Mapped[float]
    p50_ms: Mapped[float | None]
    p95_ms: Mapped[float | None]
    p99_ms: Mapped[float | None]
    max_ms: Mapped[float | None]
    labelled: Mapped[int]
    accuracy: Mapped[float | None]
    agreement: Mapped[float | None]
    cpu_percent: Mapped[float | None]
    rss_mb: Mapped[float | None]
    temperature_c: Mapped[float | None]
    dropped_windows: Mapped[int]
    received_at: Mapped[float]                         # controller clock


class CommandStatusRow(Base):
    """Every command status a device reported, in arrival order (append only)."""

    __tablename__ = "command_statuses"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    command_id: Mapped[str] = mapped_column(index=True)
    kind: Mapped[str]
    state: Mapped[str]                                 # CommandState value
    stage: Mapped[str | None]                          # InstallStage value
    model_name: Mapped[str | None]
    model_version: Mapped[int | None]
    reason: Mapped[str]
    ts: Mapped[float]                                  # device clock
    received_at: Mapped[float]                         # controller clock


class AuditEntry(Base):
    """What an operator did and what the rollout engine decided, and why."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "subject", "ts"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    ts: Mapped[float] = mapped_column(default=time.time)
    actor: Mapped[str]                                 # "operator:alice", "engine"
    action: Mapped[str]                                # "rollout.create", "group.gate-failed"
    subject: Mapped[str]                               # "ro-0001", "device:pi-0007"
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
