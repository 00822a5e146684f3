"""`onnx-int8` for generic ARM and x86 CPUs: static QDQ quantization, per-channel weights.

Calibrated on the calibration split. The result must load on the older onnxruntime builds that
devices run (1.17 on many Raspberry Pi images), so the opset imports that quantization stamps
but no node uses (`ai.onnx.ml` 5 from quant_pre_process, which 1.17 rejects) are stripped, and
the IR version is kept at what the source used.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.graph_stats import graph_stats
from controller.variants.source import EvalData, SourceModel
from edgefleet.contract import FileFormat, Runtime, RuntimeRequirement, VariantKind

KIND = VariantKind.ONNX_INT8


def quantize_static_int8(src: Path, dst: Path, calib_x: np.ndarray, input_name: str) -> None:
    """Quantizes an FP32 ONNX file to INT8 QDQ (S8S8, per-channel weights) at `dst`."""
    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source_ir = onnx.load(str(src), load_external_data=False).ir_version
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        q.quantize_static(
            str(prepared), str(dst), _CalibrationReader(input_name, calib_x),
            quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax)
    model = onnx.load(str(dst))
    strip_unused_opsets(model)
    compact(model)
    model.ir_version = min(model.ir_version, max(source_ir, 8))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def strip_unused_opsets(model: Any) -> None:
    """Drops opset imports of domains no node uses (older runtimes reject unknown versions)."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def compact(model: Any) -> None:
    """Shortens node names and drops inferred value_info: on a small model the quantizer's
    long node names are ~5% of the file, and every byte is downloaded by every device."""
    for index, node in enumerate(model.graph.node):
        node.name = f"n{index}"
        node.doc_string = ""
    del model.graph.value_info[:]


class _CalibrationReader:
    """Feeds calibration samples one at a time, as onnxruntime's CalibrationDataReader expects."""

    def __init__(self, input_name: str, calib_x: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{input_name: calib_x[i:i + 1].astype(np.float32)} for i in range(len(calib_x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def build(source: SourceModel, data: EvalData, workdir: Path) -> BuiltVariant:
    import onnx

    path = workdir / f"{source.model_name}.{KIND.value}.onnx"
    try:
        quantize_static_int8(source.path, path, data.calib_x, source.input_name)
    except Exception as exc:
        raise BuildError(f"static INT8 quantization failed: {type(exc).__name__}: {exc}"
                         ) from None
    stats = graph_stats(onnx.load(str(path)))
    return BuiltVariant(
        kind=KIND, path=path, file_format=FileFormat.ONNX,
        runtime=RuntimeRequirement(runtime=Runtime.ONNXRUNTIME,
                                   targets=("CPUExecutionProvider",)),
        notes=(f"static QDQ INT8, per-channel weights, {len(data.calib_x)} calibration "
               "samples",), params=stats.params, macs=stats.macs)
