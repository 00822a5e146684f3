"""Registering a model: build its variants with the pipeline, then record them in the database.

Artifacts are kept under the controller home (artifacts/<model>/v<version>/), where the chunk
server reads them. The database rows are written in one transaction after every variant has
been built and measured, so a failed build registers nothing half-way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from sqlalchemy import Engine, func, insert, select

from controller.db.schema import AuditEntry, Model, ModelVersion, Variant
from controller.variants.pipeline import Progress, build_variants
from controller.variants.source import load_source
from edgefleet.contract import VariantKind


class RegistryError(ValueError):
    pass


@dataclass
class Registered:
    model_name: str
    version: int
    variants: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def register_model(db: Engine, artifacts: Path, source: Path, data: Path, *,
                   name: str | None = None, version: int | None = None,
                   only: Sequence[str] = (), progress: Progress = lambda kind, what: None
                   ) -> Registered:
    model_name = name or load_source(source).model_name
    with db.connect() as conn:
        latest = conn.execute(
            select(func.max(ModelVersion.version)).join(Model, Model.id == ModelVersion.model_id)
            .where(Model.name == model_name)).scalar()
    version = version or (latest or 0) + 1
    if latest is not None and version <= latest:
        raise RegistryError(f"{model_name} already has version {latest}; versions only go up "
                            f"(got {version})")
    try:
        kinds = [VariantKind(k) for k in only] or None
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
    out_dir = artifacts / model_name / f"v{version}"
    report = build_variants(source, data, out_dir, kinds=kinds, model_version=version,
                            progress=progress)
    result = Registered(model_name, version,
                        failures=[f"{f.kind.value}: {f.reason}" for f in report.failures])
    if not report.records:
        raise RegistryError("no variant could be built: " + "; ".join(result.failures))
    now = time.time()
    with db.begin() as conn:
        model_id = conn.execute(select(Model.id).where(Model.name == model_name)).scalar()
        if model_id is None:
            model_id = conn.execute(insert(Model).values(name=model_name, created_at=now)
                                    .returning(Model.id)).scalar_one()
        version_id = conn.execute(insert(ModelVersion).values(
            model_id=model_id, version=version, source_sha256=report.source.sha256,
            source_file=str(source.resolve()), created_at=now).returning(ModelVersion.id)
        ).scalar_one()
        for record in report.records:
            m = record.metrics
            conn.execute(insert(Variant).values(
                model_version_id=version_id, artifact_id=record.artifact_id,
                kind=record.variant_kind.value, file_format=record.file_format.value,
                runtime=msgspec.to_builtins(record.runtime), sha256=record.sha256,
                size_bytes=record.size_bytes, file=str((out_dir / record.file).resolve()),
                accuracy=m.accuracy, agreement=m.agreement, latency_p50_ms=m.latency_p50_ms,
                latency_p95_ms=m.latency_p95_ms, params=m.params, macs=m.macs,
                measured_on=m.measured_on,
                measurement=msgspec.to_builtins(record.measurement),
                notes=list(record.notes), built_at=record.built_at))
            result.variants.append(record.artifact_id)
        conn.execute(insert(AuditEntry).values(
            ts=now, actor="operator", action="model.add", subject=f"{model_name}:v{version}",
            detail={"variants": result.variants, "failures": result.failures}))
    return result
