"""The variants table: each variant's figures, and its ratios to the FP32 reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.variants.record import VariantRecord
from edgefleet.contract import VariantKind


@dataclass(frozen=True)
class SummaryRow:
    record: VariantRecord
    size_ratio: float | None          # to FP32; None when FP32 was not built
    accuracy_delta_points: float | None
    latency_ratio: float | None       # p50, to FP32 measured in the same run
    macs_ratio: float | None

    def as_dict(self) -> dict[str, object]:
        r, m = self.record, self.record.measurement
        return {
            "kind": r.variant_kind.value, "file": r.file, "artifact_id": r.artifact_id,
            "size_bytes": r.size_bytes, "size_ratio": self.size_ratio,
            "accuracy": m.accuracy, "accuracy_delta_points": self.accuracy_delta_points,
            "agreement": m.agreement, "latency_p50_ms": m.latency_p50_ms,
            "latency_p95_ms": m.latency_p95_ms, "latency_ratio": self.latency_ratio,
            "throughput_ips": m.throughput_ips, "batch_size": m.batch_size,
            "execution": m.execution, "params": r.metrics.params, "macs": r.metrics.macs,
            "macs_ratio": self.macs_ratio, "notes": list(r.notes),
        }


def summarize(records: Sequence[VariantRecord]) -> list[SummaryRow]:
    reference = next((r for r in records if r.variant_kind is VariantKind.ONNX_FP32), None)
    rows = []
    for record in sorted(records, key=lambda r: list(VariantKind).index(r.variant_kind)):
        if reference is None:
            rows.append(SummaryRow(record, None, None, None, None))
            continue
        ref_m, m = reference.measurement, record.measurement
        macs_ratio = (record.metrics.macs / reference.metrics.macs
                      if record.metrics.macs and reference.metrics.macs else None)
        rows.append(SummaryRow(
            record, record.size_bytes / reference.size_bytes,
            (m.accuracy - ref_m.accuracy) * 100, m.latency_p50_ms / ref_m.latency_p50_ms,
            macs_ratio))
    return rows
