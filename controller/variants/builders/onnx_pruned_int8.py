"""`onnx-pruned-int8` for Raspberry Pi: structured pruning with least-squares refits, then the
same static INT8 as `onnx-int8`. Whole channels go, so onnxruntime on a CPU does less work, not
just a smaller download; the refits replace a training loop, using the calibration split only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.source import EvalData, SourceModel
from edgefleet.contract import FileFormat, Runtime, RuntimeRequirement, VariantKind

if TYPE_CHECKING:
    import onnx

    from controller.variants.pruning import PruneResult

KIND = VariantKind.ONNX_PRUNED_INT8
# Metadata the source states about itself that the pruned model would repeat wrongly.
STALE_METADATA = frozenset({"parameters", "macs_per_image", "eval_accuracy", "eval_samples"})


def build(source: SourceModel, data: EvalData, workdir: Path) -> BuiltVariant:
    import onnx

    from controller.variants.builders.onnx_int8 import quantize_static_int8
    from controller.variants.pruning import UnprunableGraph, prune

    try:
        result = prune(source.load(), data.calib_x)
    except UnprunableGraph as exc:
        raise BuildError(f"cannot prune {source.path.name}: {exc}") from None
    except Exception as exc:
        raise BuildError(f"pruning failed: {_one_line(exc)}") from None
    pruned_path = workdir / f"{source.model_name}.pruned-fp32.onnx"
    onnx.save(restated(result), str(pruned_path))
    path = workdir / f"{source.model_name}.{KIND.value}.onnx"
    try:
        quantize_static_int8(pruned_path, path, data.calib_x, source.input_name)
    except Exception as exc:
        raise BuildError(f"static INT8 quantization of the pruned model failed: "
                         f"{_one_line(exc)}") from None
    return BuiltVariant(
        kind=KIND, path=path, file_format=FileFormat.ONNX,
        runtime=RuntimeRequirement(runtime=Runtime.ONNXRUNTIME,
                                   targets=("CPUExecutionProvider",)),
        notes=(f"pruned: {result.summary()}",
               f"refitted by least squares and quantized to static QDQ INT8 (per-channel "
               f"weights) on {len(data.calib_x)} calibration samples"),
        params=result.after.params, macs=result.after.macs)


def restated(result: PruneResult) -> onnx.ModelProto:
    """The pruned model without the source's claims about its own size and accuracy, and with
    what pruning did, so the file deployed to a device does not describe another model."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(result.model)
    kept = {p.key: p.value for p in model.metadata_props if p.key not in STALE_METADATA}
    onnx.helper.set_model_props(model, kept | {
        "parameters": str(result.after.params), "macs_per_image": str(result.after.macs),
        "pruned": result.summary()})
    return model


def _one_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
