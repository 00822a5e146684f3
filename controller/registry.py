"""Registering a model: build its variants with the pipeline, then record them in the database.

Artifacts are kept under the controller home (artifacts/<model>/v<version>/), where the chunk
server reads them. The database rows are written in one transaction after every variant has
been built and measured, so a failed build registers nothing half-way.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from sqlalchemy import Engine, exc, func, insert, select

from controller.db.schema import AuditEntry, Model, ModelVersion, Variant
from controller.variants.pipeline import BUILDERS, Progress, build_variants
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
    kinds = _kinds(only)
    model_name = name or load_source(source).model_name
    with db.connect() as conn:
        latest = conn.execute(
            select(func.max(ModelVersion.version)).join(Model, Model.id == ModelVersion.model_id)
            .where(Model.name == model_name)).scalar()
    version = version or (latest or 0) + 1
    if latest is not None and version <= latest:
        raise RegistryError(f"{model_name} already has version {latest}; versions only go up "
                            f"(got {version})")
    out_dir = artifacts / model_name / f"v{version}"
    # A folder this call made goes again when nothing gets registered; one already there
    # (an earlier attempt's) is not ours to delete.
    made = _outermost_missing(out_dir)
    try:
        return _build_and_record(db, source, data, out_dir, model_name, version, kinds,
                                 progress)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def _kinds(only: Sequence[str]) -> list[VariantKind] | None:
    known = {k.value: k for k in BUILDERS}
    unknown = [k for k in only if k not in known]
    if unknown:
        raise RegistryError(f"unknown variant kind {', '.join(map(repr, unknown))}: choose from "
                            f"{', '.join(known)}")
    return [known[k] for k in dict.fromkeys(only)] or None


def _outermost_missing(out_dir: Path) -> Path | None:
    """The outermost folder on the way to `out_dir` that does not exist yet, if any."""
    missing = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    return missing[-1] if missing else None


def _build_and_record(db: Engine, source: Path, data: Path, out_dir: Path, model_name: str,
                      version: int, kinds: list[VariantKind] | None,
                      progress: Progress) -> Registered:
    report = build_variants(source, data, out_dir, kinds=kinds, model_version=version,
                            model_name=model_name,
                            progress=progress)
    result = Registered(model_name, version,
                        failures=[f"{f.kind.value}: {f.reason}" for f in report.failures])
    if not report.records:
        raise RegistryError("no variant could be built: " + "; ".join(result.failures))
    taken = _registered_elsewhere(db, [r.artifact_id for r in report.records])
    if taken:
        # The pipeline names artifacts after the source's own model name, not --name: the same
        # source registered under two names collides on the artifact id.
        raise RegistryError(f"artifact {', '.join(taken)} is registered already (the same "
                            f"build of {report.source.model_name!r} under another model "
                            "name or version)")
    now = time.time()
    try:
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
    except exc.IntegrityError as error:  # another `models add` got there first
        reason = str(error.orig).strip().splitlines()[0]
        raise RegistryError(f"{model_name} v{version} not registered: {reason}") from None
    return result


def _registered_elsewhere(db: Engine, artifact_ids: list[str]) -> list[str]:
    with db.connect() as conn:
        return [f"{artifact} ({model} v{version})" for artifact, model, version in conn.execute(
            select(Variant.artifact_id, Model.name, ModelVersion.version)
            .join(ModelVersion, ModelVersion.id == Variant.model_version_id)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(Variant.artifact_id.in_(artifact_ids)))]
