"""`onnx-fp32`: the validated source itself, with shapes inferred, as the reference variant."""

from __future__ import annotations

from pathlib import Path

from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.graph_stats import graph_stats
from controller.variants.source import EvalData, SourceModel
from edgefleet.contract import FileFormat, Runtime, RuntimeRequirement, VariantKind

KIND = VariantKind.ONNX_FP32


def build(source: SourceModel, data: EvalData, workdir: Path) -> BuiltVariant:
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(source.load(), strict_mode=True)
    except Exception as exc:
        raise BuildError(f"shape inference failed: {exc}") from None
    path = workdir / f"{source.model_name}.{KIND.value}.onnx"
    onnx.save(model, str(path))
    stats = graph_stats(model)
    return BuiltVariant(
        kind=KIND, path=path, file_format=FileFormat.ONNX,
        runtime=RuntimeRequirement(runtime=Runtime.ONNXRUNTIME,
                                   targets=("CUDAExecutionProvider", "CPUExecutionProvider")),
        notes=(f"opset {source.opset}, shapes inferred",), params=stats.params, macs=stats.macs)
