"""The pipeline's inputs: the source model and its calibration/evaluation data, validated.

Every problem is a `SourceError` naming the file and what is wrong, raised before any builder
runs, so a bad input costs one clear line instead of five builder tracebacks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

DATA_ARRAYS = ("calib_x", "calib_y", "eval_x", "eval_y")


class SourceError(ValueError):
    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class SourceModel:
    path: Path
    sha256: str
    model_name: str
    input_name: str
    input_shape: tuple[int | str, ...]     # e.g. ("N", 1, 8, 8)
    output_name: str
    opset: int

    def load(self) -> onnx.ModelProto:
        import onnx

        return onnx.load(str(self.path))


@dataclass(frozen=True)
class EvalData:
    path: Path
    calib_x: np.ndarray
    calib_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_source(path: Path, model_name: str | None = None) -> SourceModel:
    """Loads and checks an FP32 ONNX model: parses, passes the checker, infers shapes."""
    import onnx

    if not path.is_file():
        raise SourceError(path, "no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, google.protobuf errors...
        raise SourceError(path, f"not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise SourceError(path, "not an ONNX model (empty graph)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise SourceError(path, f"fails the ONNX checker: {exc}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not 13 <= opset <= 21:
        raise SourceError(path, f"opset {opset} unsupported (need 13 to 21)")
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise SourceError(path, f"need exactly one input and one output, found {len(inputs)} "
                                f"and {len(model.graph.output)}")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        raise SourceError(path, "input is not float32: the source must be the FP32 model")
    shape = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
    name = model_name or next((p.value for p in model.metadata_props if p.key == "name"),
                              path.stem.split(".")[0])
    return SourceModel(path=path, sha256=sha256_file(path), model_name=name,
                       input_name=inputs[0].name, input_shape=shape,
                       output_name=model.graph.output[0].name, opset=opset)


def load_data(path: Path, source: SourceModel) -> EvalData:
    """Loads the npz data file and checks its arrays against the model's input shape."""
    if not path.is_file():
        raise SourceError(path, "no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise SourceError(path, f"not a readable .npz file ({type(exc).__name__}: {exc})"
                          ) from None
    missing = [k for k in DATA_ARRAYS if k not in arrays]
    if missing:
        raise SourceError(path, f"missing arrays {', '.join(missing)} (need "
                                f"{', '.join(DATA_ARRAYS)}; found {', '.join(sorted(arrays))})")
    sample_shape = source.input_shape[1:]
    for split in ("calib", "eval"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != len(source.input_shape) or any(
                isinstance(want, int) and want > 0 and got != want
                for want, got in zip(sample_shape, x.shape[1:], strict=True)):
            raise SourceError(path, f"{split}_x has shape {x.shape}, the model "
                                    f"{source.path.name} takes {source.input_shape}")
        if len(x) == 0 or len(x) != len(y):
            raise SourceError(path, f"{split}_x has {len(x)} samples and {split}_y {len(y)}")
        if not np.issubdtype(y.dtype, np.integer):
            raise SourceError(path, f"{split}_y must hold integer labels, not {y.dtype}")
    return EvalData(path=path, calib_x=arrays["calib_x"].astype(np.float32),
                    calib_y=arrays["calib_y"].astype(np.int64),
                    eval_x=arrays["eval_x"].astype(np.float32),
                    eval_y=arrays["eval_y"].astype(np.int64))
