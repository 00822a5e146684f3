"""Runs the builders, measures each variant, and files it in the output folder.

Inputs are validated once, up front (SourceError). After that each builder runs on its own: a
failing one is reported with its reason and the others still run. Each variant is built in a
scratch folder inside the output folder and moved into place file by file (artifact first,
record last), so an interrupted or failed build leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from controller.variants.builders import (
    onnx_fp16,
    onnx_fp32,
    onnx_int8,
    onnx_pruned_int8,
    tflite_int8,
)
from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.measure import Measurement, measure, predictions
from controller.variants.record import VariantRecord, encode_record, record_path
from controller.variants.source import EvalData, SourceModel, load_data, load_source, sha256_file
from edgefleet.contract import BuildMetrics, Runtime, RuntimeRequirement, VariantKind
from edgefleet.inference import load_model

BuildFunction = Callable[[SourceModel, EvalData, Path], BuiltVariant]

# In build order: FP32 first, it is the reference every other variant is compared with.
BUILDERS: Mapping[VariantKind, BuildFunction] = {
    module.KIND: module.build
    for module in (onnx_fp32, onnx_fp16, onnx_int8, onnx_pruned_int8, tflite_int8)
}


@dataclass(frozen=True)
class BuildFailure:
    kind: VariantKind
    reason: str


@dataclass
class PipelineReport:
    source: SourceModel
    reference_accuracy: float
    records: list[VariantRecord] = field(default_factory=list)
    failures: list[BuildFailure] = field(default_factory=list)


Progress = Callable[[VariantKind, str], None]


def build_variants(source_path: Path, data_path: Path, out_dir: Path, *,
                   kinds: Sequence[VariantKind] | None = None, model_version: int | None = None,
                   model_name: str | None = None,
                   progress: Progress = lambda kind, what: None,
                   builders: Mapping[VariantKind, BuildFunction] = BUILDERS) -> PipelineReport:
    """Builds, measures and files the requested variant kinds (all by default)."""
    source = load_source(source_path, model_name)
    data = load_data(data_path, source)
    version = model_version or _declared_version(source)
    reference = load_model(source.path, RuntimeRequirement(runtime=Runtime.ONNXRUNTIME),
                           threads=1)
    reference_predictions = predictions(reference, data.eval_x)
    report = PipelineReport(
        source, float((reference_predictions == data.eval_y).mean()))
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(out_dir)
    for kind in kinds or list(builders):
        progress(kind, "building")
        try:
            record = _build_one(builders[kind], kind, source, data, out_dir, version,
                                reference_predictions, progress)
        except BuildError as exc:
            report.failures.append(BuildFailure(kind, str(exc)))
            progress(kind, f"failed: {exc}")
            continue
        except Exception as exc:  # a builder bug must not take the other variants down
            reason = f"unexpected {type(exc).__name__}: {exc}"
            report.failures.append(BuildFailure(kind, reason))
            progress(kind, f"failed: {reason}")
            continue
        report.records.append(record)
        progress(kind, "done")
    return report


def _build_one(build: BuildFunction, kind: VariantKind, source: SourceModel, data: EvalData,
               out_dir: Path, version: int, reference: np.ndarray, progress: Progress
               ) -> VariantRecord:
    with tempfile.TemporaryDirectory(prefix=f".building-{kind.value}-", dir=out_dir) as tmp:
        built = build(source, data, Path(tmp))
        if built.kind is not kind:
            raise BuildError(f"builder for {kind.value} returned a {built.kind.value}")
        progress(kind, "measuring")
        measured_file, measured_runtime = built.measured_as or (built.path, built.runtime)
        measured = measure(measured_file, measured_runtime, data, reference)
        sha = sha256_file(built.path)
        file = f"{source.model_name}-v{version}.{kind.value}{built.path.suffix}"
        record = VariantRecord(
            artifact_id=f"{source.model_name}-v{version}-{kind.value}-{sha[:8]}",
            model_name=source.model_name, model_version=version, variant_kind=kind,
            file_format=built.file_format, runtime=built.runtime, sha256=sha,
            size_bytes=built.path.stat().st_size, metrics=_metrics(measured, built.params,
                                                                   built.macs),
            file=file, source_sha256=source.sha256, built_at=time.time(),
            measurement=measured, notes=built.notes, log=built.log)
        staged_record = Path(tmp) / "record.json"
        staged_record.write_bytes(encode_record(record))
        os.replace(built.path, out_dir / file)
        os.replace(staged_record, record_path(out_dir, file))
    return record


def _metrics(m: Measurement, params: int | None, macs: int | None) -> BuildMetrics:
    return BuildMetrics(accuracy=m.accuracy, agreement=m.agreement,
                        latency_p50_ms=m.latency_p50_ms, latency_p95_ms=m.latency_p95_ms,
                        measured_on=m.execution, params=params, macs=macs)


def _declared_version(source: SourceModel) -> int:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(source.path)).metadata_props}
    try:
        return max(1, int(props.get("version", "1")))
    except ValueError:
        return 1


def remove_stale_scratch(out_dir: Path) -> None:
    """Scratch folders left by a killed build (a crash skips TemporaryDirectory's cleanup)."""
    for scratch in out_dir.glob(".building-*"):
        shutil.rmtree(scratch, ignore_errors=True)
