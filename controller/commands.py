"""Turning the engine's actions into signed commands on the wire.

A DeployTo becomes a manifest issued for that one device (its id, an expiry, the variant's
file facts), signed with the fleet key and wrapped in a DeployCommand under the engine's
command id; a RollbackDevice becomes a RollbackCommand.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from sqlalchemy import Engine, select

from controller.db.schema import Model, ModelVersion, Variant
from controller.keys import SigningKey
from controller.rollout.events import DeployTo, RollbackDevice
from edgefleet.contract import (
    BuildMetrics,
    CommandKind,
    DeployCommand,
    FileFormat,
    Manifest,
    RollbackCommand,
    RuntimeRequirement,
    TopicSchema,
    VariantKind,
    encode,
)
from edgefleet.contract.signing import sign_manifest


class CommandIssuer:
    def __init__(self, db: Engine, key: SigningKey, schema: TopicSchema,
                 publish: Callable[[str, bytes], bool], *, chunk_size: int,
                 manifest_ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.key = key
        self.schema = schema
        self._publish = publish
        self.chunk_size = chunk_size
        self.manifest_ttl_s = manifest_ttl_s
        self._clock = clock
        # A registered variant never changes, so a wave of deploys of one variant costs one
        # query, not one per device (that query was most of the time to issue a command).
        self._variant = functools.lru_cache(maxsize=256)(self._load_variant)

    def __call__(self, action: DeployTo | RollbackDevice, config: dict[str, Any]) -> bool:
        now = self._clock()
        if isinstance(action, RollbackDevice):
            command = RollbackCommand(command_id=action.command_id, ts=now,
                                      reason=action.reason, rollout_id=action.rollout_id)
            return self._publish(self.schema.command(action.device_id, CommandKind.ROLLBACK),
                                 encode(command))
        manifest = self.manifest(int(action.variant_id), action.device_id, now)
        deploy = DeployCommand(
            command_id=action.command_id, ts=now,
            manifest=msgspec.Raw(sign_manifest(manifest, self.key.private)),
            rollout_id=action.rollout_id, watch_s=float(config.get("watch_s") or 60.0),
            min_accuracy=config.get("min_accuracy"))
        return self._publish(self.schema.command(action.device_id, CommandKind.DEPLOY),
                             encode(deploy))

    def manifest(self, variant_id: int, device_id: str, now: float) -> Manifest:
        row = self._variant(variant_id)
        return Manifest(
            artifact_id=row["artifact_id"], model_name=row["model_name"],
            model_version=row["model_version"], variant_kind=VariantKind(row["kind"]),
            file_format=FileFormat(row["file_format"]),
            runtime=msgspec.convert(row["runtime"], RuntimeRequirement), sha256=row["sha256"],
            size_bytes=row["size_bytes"], chunk_size=self.chunk_size,
            metrics=BuildMetrics(accuracy=row["accuracy"], agreement=row["agreement"],
                                 latency_p50_ms=row["latency_p50_ms"],
                                 latency_p95_ms=row["latency_p95_ms"],
                                 measured_on=row["measured_on"], params=row["params"],
                                 macs=row["macs"]),
            issued_at=now, expires_at=now + self.manifest_ttl_s, device_id=device_id)

    def _load_variant(self, variant_id: int) -> Mapping[str, Any]:
        with self.db.connect() as conn:
            return dict(conn.execute(
                select(Variant.__table__, Model.name.label("model_name"),
                       ModelVersion.version.label("model_version"))
                .join(ModelVersion, ModelVersion.id == Variant.model_version_id)
                .join(Model, Model.id == ModelVersion.model_id)
                .where(Variant.id == variant_id)).mappings().one())
