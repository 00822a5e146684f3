"""Builds every variant of the demo model and prints size, accuracy change, latency and MACs as
ratios to FP32, all measured in this one run; then checks the targets.

    python benchmarks/variants.py [--out DIR] [--threads N]

Targets (issue 4): INT8 variants lose at most 0.5 accuracy points and are at most 0.3x the FP32
size; the pruned INT8 variant has at least 2x fewer MACs than FP32 and loses at most 1 point.
Latency ratios are printed, not checked: they depend on the machine (and FP16 on a CPU is not
meant to be faster). Exits 1 when a target is missed or a variant failed to build.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.variants.pipeline import build_variants  # noqa: E402
from controller.variants.summary import SummaryRow, summarize  # noqa: E402
from edgefleet.contract import VariantKind  # noqa: E402

SOURCE = ROOT / "artifacts/digits/digits.fp32.onnx"
DATA = ROOT / "artifacts/digits/digits.data.npz"
INT8_KINDS = (VariantKind.ONNX_INT8, VariantKind.ONNX_PRUNED_INT8, VariantKind.TFLITE_INT8)


def check_targets(rows: dict[VariantKind, SummaryRow]) -> list[tuple[str, bool, str]]:
    checks = []
    for kind in INT8_KINDS:
        row = rows.get(kind)
        if row is None:
            checks.append((f"{kind.value} built", False, "not built"))
            continue
        assert row.accuracy_delta_points is not None and row.size_ratio is not None
        limit = 1.0 if kind is VariantKind.ONNX_PRUNED_INT8 else 0.5
        checks.append((f"{kind.value} accuracy loss <= {limit} pts",
                       row.accuracy_delta_points >= -limit,
                       f"{row.accuracy_delta_points:+.2f} pts"))
        checks.append((f"{kind.value} size <= 0.3x FP32", row.size_ratio <= 0.3,
                       f"{row.size_ratio:.3f}x"))
    pruned = rows.get(VariantKind.ONNX_PRUNED_INT8)
    if pruned is not None and pruned.macs_ratio is not None:
        checks.append(("onnx-pruned-int8 MACs >= 2x fewer", pruned.macs_ratio <= 0.5,
                       f"{1 / pruned.macs_ratio:.2f}x fewer"))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="keep the variants here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        report = build_variants(SOURCE, DATA, out,
                                progress=lambda kind, what: print(f"  {kind.value:<18} {what}",
                                                                  flush=True))
        rows = {row.record.variant_kind: row for row in summarize(report.records)}
    print(f"\nFP32 reference accuracy {report.reference_accuracy:.4f} on "
          f"{rows[VariantKind.ONNX_FP32].record.measurement.samples} held-out samples; "
          "latency is one sample at a time, one thread\n")
    header = (f"{'variant':<18} {'bytes':>8} {'size x':>7} {'acc':>7} {'d pts':>6} "
              f"{'p50 ms':>7} {'lat x':>6} {'thru/s':>8} {'MACs x':>7}  ran on")
    print(header)
    print("-" * len(header))
    for row in rows.values():
        r, m = row.record, row.record.measurement
        print(f"{r.variant_kind.value:<18} {r.size_bytes:>8} {row.size_ratio or 0:>7.3f} "
              f"{m.accuracy:>7.4f} {row.accuracy_delta_points or 0:>+6.2f} "
              f"{m.latency_p50_ms:>7.3f} {row.latency_ratio or 0:>6.2f} "
              f"{m.throughput_ips:>8.0f} {row.macs_ratio or 0:>7.3f}  {m.execution}")
    for failure in report.failures:
        print(f"{failure.kind.value:<18} FAILED: {failure.reason}")
    print("\ntargets:")
    checks = check_targets(rows)
    for name, ok, figure in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name:<40} {figure}")
    return 0 if all(ok for _, ok, _ in checks) and not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
