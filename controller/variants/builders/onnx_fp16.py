"""`onnx-fp16` for Jetson: float16 weights and compute, float32 inputs and outputs.

Meant for the CUDA and TensorRT execution providers. On a CPU onnxruntime runs it by casting,
which is not faster; the record says so instead of showing a CPU speed-up. The manifest allows
no CPU fallback: a Jetson whose GPU provider fails should get a variant built for CPUs.
"""

from __future__ import annotations

from pathlib import Path

from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.graph_stats import graph_stats
from controller.variants.source import EvalData, SourceModel
from edgefleet.contract import FileFormat, Runtime, RuntimeRequirement, VariantKind

KIND = VariantKind.ONNX_FP16
GPU_TARGETS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_NOTE = ("FP16 is meant for the CUDA/TensorRT providers; on a CPU it runs but is not "
            "faster, so CPU latency here is not a Jetson figure")


def build(source: SourceModel, data: EvalData, workdir: Path) -> BuiltVariant:
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise BuildError(f"onnxconverter-common is not installed ({exc}): "
                         "pip install 'edgefleet[build]'") from None
    model = source.load()
    try:
        half = float16.convert_float_to_float16(model, keep_io_types=True)
        onnx.checker.check_model(half)
    except Exception as exc:
        raise BuildError(f"float16 conversion failed: {exc}") from None
    path = workdir / f"{source.model_name}.{KIND.value}.onnx"
    onnx.save(half, str(path))
    stats = graph_stats(model)
    return BuiltVariant(
        kind=KIND, path=path, file_format=FileFormat.ONNX,
        runtime=RuntimeRequirement(runtime=Runtime.ONNXRUNTIME, targets=GPU_TARGETS,
                                   cpu_fallback=False),
        notes=(CPU_NOTE,), params=stats.params, macs=stats.macs)
