"""`tflite-int8` for the Coral Edge TPU: a full-integer INT8 TFLite model, converted from the
ONNX source by onnx2tf (to an NHWC SavedModel) and TensorFlow's post-training quantizer.

The batch is fixed at 1 because a dynamic batch adds shape ops the Edge TPU rejects. Every op
must be a builtin INT8 kernel (no float fallback), and the result is checked from the file
itself (tflite_inspect) before it is returned. Where `edgetpu_compiler` is installed, the model
is also compiled for the Edge TPU; where it is not, the notes say so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.edgetpu_ops import describe_marks, mark_ops, marks_table
from controller.variants.graph_stats import graph_stats
from controller.variants.source import EvalData, SourceModel
from controller.variants.tflite_inspect import TfliteFormatError, inspect_tflite
from edgefleet.contract import FileFormat, Runtime, RuntimeRequirement, VariantKind

KIND = VariantKind.TFLITE_INT8
EDGETPU_COMPILER = "edgetpu_compiler"
NOT_COMPILED_NOTE = "not compiled: edgetpu_compiler not present"
INSTALL_HINT = "install the TFLite tooling with .ci/install-tflite"
COMPILER_TIMEOUT_S = 600
CONVERSION_RECURSION_LIMIT = 10_000

IoDtype = Literal["int8", "uint8"]


def build(source: SourceModel, data: EvalData, workdir: Path, *, io_dtype: IoDtype = "int8",
          compiler: str = EDGETPU_COMPILER) -> BuiltVariant:
    path = workdir / f"{source.model_name}.{KIND.value}.tflite"
    with _converters() as (tf, onnx2tf), \
            tempfile.TemporaryDirectory(prefix="onnx2tf-", dir=workdir) as tmp:
        saved_model, input_shape = onnx_to_saved_model(onnx2tf, source.path, Path(tmp))
        calibration = to_layout(data.calib_x, input_shape)
        path.write_bytes(quantize_full_integer(tf, saved_model, calibration, io_dtype))
        versions = f"onnx2tf {onnx2tf.__version__}, TensorFlow {tf.__version__}"

    try:
        graph = inspect_tflite(path)
    except TfliteFormatError as exc:
        raise BuildError(f"the converted model cannot be read back: {exc}") from None
    marks = mark_ops(graph.operators)
    log = "operators (Coral's documented Edge TPU op list; the compiler decides):\n"
    log += marks_table(marks)
    if not graph.full_integer:
        shown = "; ".join(graph.integer_problems[:3])
        more = len(graph.integer_problems) - 3
        raise BuildError(f"the converted model is not full-integer: {shown}"
                         + (f" (and {more} more)" if more > 0 else ""))

    notes = [f"full-integer INT8, {io_dtype} input and output, batch 1, "
             f"{len(data.calib_x)} calibration samples ({versions})",
             describe_marks(marks)]
    stats = graph_stats(source.load())
    portable = RuntimeRequirement(runtime=Runtime.LITERT, targets=("edgetpu", "cpu"),
                                  cpu_fallback=True)
    if shutil.which(compiler) is None:
        notes.append(NOT_COMPILED_NOTE)
        return BuiltVariant(kind=KIND, path=path, file_format=FileFormat.TFLITE,
                            runtime=portable, notes=tuple(notes), params=stats.params,
                            macs=stats.macs, log=log)
    compiled = compile_for_edgetpu(path, workdir, compiler)
    notes.append(compiled.note())
    log += "\n\nedgetpu_compiler:\n" + compiled.log
    # A compiled model holds an edgetpu-custom-op that only the delegate runs, so it ships
    # without CPU fallback; it is measured as the uncompiled file, whose integer arithmetic the
    # Edge TPU reproduces, since this machine has no Edge TPU to time it on.
    notes.append("measured as the uncompiled full-integer model on the CPU")
    return BuiltVariant(
        kind=KIND, path=compiled.path, file_format=FileFormat.TFLITE,
        runtime=RuntimeRequirement(runtime=Runtime.LITERT, targets=("edgetpu",),
                                   cpu_fallback=False),
        notes=tuple(notes), params=stats.params, macs=stats.macs, log=log,
        measured_as=(path, portable))


@contextlib.contextmanager
def _converters() -> Iterator[tuple[Any, Any]]:
    """Imports TensorFlow and onnx2tf, and keeps onnx2tf's process-wide changes inside the build.

    Importing onnx2tf silences every Python warning, sets TensorFlow's logger to FATAL (which
    hides errors), sets TF_CPP_MIN_LOG_LEVEL=3 and lifts the recursion limit to 2**31: in a
    long-running controller that would hide later errors and turn a runaway recursion into a
    crash. TensorFlow's C++ logging reads its level once, so INFO and WARNING are turned off
    (level 2) before TensorFlow is first imported, unless the caller chose a level.
    """
    env_names = ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")
    saved_env = {name: os.environ.get(name) for name in env_names}
    tf_logger = logging.getLogger("tensorflow")
    saved_level = tf_logger.level
    saved_limit = sys.getrecursionlimit()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with warnings.catch_warnings():
            tf, onnx2tf = _import_converters()
            tf_logger.setLevel(logging.ERROR)
            # onnx2tf walks the graph recursively: generous, but finite and the same each call.
            sys.setrecursionlimit(max(saved_limit, CONVERSION_RECURSION_LIMIT))
            yield tf, onnx2tf
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tf_logger.setLevel(saved_level)
        sys.setrecursionlimit(saved_limit)


def _import_converters() -> tuple[Any, Any]:
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise BuildError(f"tensorflow is not installed ({exc}): {INSTALL_HINT}") from None
    try:
        import onnx2tf
    except ImportError as exc:
        raise BuildError(f"onnx2tf is not installed or cannot import ({exc}): {INSTALL_HINT}"
                         ) from None
    return tf, onnx2tf


def onnx_to_saved_model(onnx2tf: Any, source: Path, workdir: Path
                        ) -> tuple[Path, tuple[int, ...]]:
    """Converts the ONNX file to an NHWC SavedModel with batch 1; returns it and its input shape.

    onnx2tf rewrites its input file in place (it renames nodes), so it works on a copy.
    """
    copy = workdir / "source.onnx"
    shutil.copyfile(source, copy)
    saved_model = workdir / "saved_model"
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            model = onnx2tf.convert(
                input_onnx_file_path=str(copy), output_folder_path=str(saved_model),
                batch_size=1, non_verbose=True,
                not_use_onnxsim=True,        # onnxsim is optional, and runs as a subprocess
                copy_onnx_input_output_names_to_tflite=True)
        input_shape = tuple(int(d) for d in model.inputs[0].shape)
    except (Exception, SystemExit) as exc:    # onnx2tf calls sys.exit(1) on some failures
        raise BuildError(f"onnx2tf cannot convert {source.name}: "
                         f"{_onnx2tf_error(output.getvalue(), exc)}") from None
    return saved_model, input_shape


def _onnx2tf_error(output: str, exc: BaseException) -> str:
    """onnx2tf's own ERROR line says more than the exception (an unknown op surfaces as a
    ModuleNotFoundError for onnx2tf.ops.<Op>)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)
    errors = [line.removeprefix("ERROR:").strip() for line in plain.splitlines()
              if line.startswith("ERROR:") and line.removeprefix("ERROR:").strip()]
    return errors[0] if errors else f"{type(exc).__name__}: {exc}".splitlines()[0]


def to_layout(samples: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """The samples in the SavedModel's layout: onnx2tf turns an NCHW input into NHWC."""
    want = tuple(input_shape[1:])
    if tuple(samples.shape[1:]) == want:
        return samples.astype(np.float32)
    if samples.ndim == 4 and tuple(samples.transpose(0, 2, 3, 1).shape[1:]) == want:
        return np.ascontiguousarray(samples.transpose(0, 2, 3, 1), dtype=np.float32)
    raise BuildError(f"calibration samples of shape {samples.shape[1:]} fit neither the "
                     f"converted model's input {input_shape} nor its NHWC transpose")


def quantize_full_integer(tf: Any, saved_model: Path, calibration: np.ndarray,
                          io_dtype: IoDtype) -> bytes:
    """Post-training full-integer quantization: INT8 builtin kernels only, INT8/UINT8 I/O."""

    def representative_dataset() -> Iterator[list[np.ndarray]]:
        for sample in calibration:
            yield [sample[None]]

    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8 if io_dtype == "int8" else tf.uint8
        converter.inference_output_type = converter.inference_input_type
        model: bytes = converter.convert()
    except Exception as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if "error" in line),
                      str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise BuildError(f"TensorFlow's INT8 quantizer failed: {type(exc).__name__}: {reason}"
                         ) from None
    return model


@dataclass(frozen=True)
class EdgeTpuCompilation:
    path: Path                  # the compiled model, beside the uncompiled one
    mapped: int | None          # ops mapped to the Edge TPU, when the log says
    total: int | None
    log: str

    def note(self) -> str:
        if self.mapped is None or self.total is None:
            return (f"compiled for the Edge TPU ({self.path.name}); the compiler log gives no "
                    "op count")
        return (f"compiled for the Edge TPU: {self.mapped} of {self.total} ops mapped "
                f"({self.path.name})")


def compile_for_edgetpu(model: Path, out_dir: Path, compiler: str = EDGETPU_COMPILER
                        ) -> EdgeTpuCompilation:
    """Runs `edgetpu_compiler -s -o OUT_DIR model`; it writes <stem>_edgetpu.tflite there."""
    try:
        done = subprocess.run([compiler, "-s", "-o", str(out_dir), str(model)],
                              capture_output=True, text=True, timeout=COMPILER_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"edgetpu_compiler did not run: {type(exc).__name__}: {exc}"
                         ) from None
    log = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        last = log.splitlines()[-1] if log else "no output"
        raise BuildError(f"edgetpu_compiler failed (exit {done.returncode}): {last}")
    compiled = out_dir / f"{model.stem}_edgetpu.tflite"
    if not compiled.is_file():
        raise BuildError(f"edgetpu_compiler exited 0 but wrote no {compiled.name}")
    mapped, total = parse_compiler_counts(log)
    return EdgeTpuCompilation(compiled, mapped, total, log)


_TABLE_ROW = re.compile(r"^(\w+)\s+(\d+)\s+(\S.*)$")


def parse_compiler_counts(log: str) -> tuple[int | None, int | None]:
    """(ops mapped to the Edge TPU, ops in all) from the compiler's output, None where absent.

    With -s the compiler prints a table (Operator, Count, Status, status "Mapped to Edge TPU"
    for mapped ops); it also prints "Total number of operations: M" and, when some ops stay on
    the CPU, "Number of operations that will run on Edge TPU: N".
    """
    mapped = total = 0
    in_table = False
    for line in log.splitlines():
        if line.split()[:3] == ["Operator", "Count", "Status"]:
            in_table = True
            continue
        row = _TABLE_ROW.match(line.strip()) if in_table else None
        if row:
            total += int(row.group(2))
            mapped += int(row.group(2)) if row.group(3).startswith("Mapped to Edge TPU") else 0
    if total:
        return mapped, total
    on_tpu = re.search(r"operations that will run on Edge TPU:\s*(\d+)", log)
    on_cpu = re.search(r"operations that will run on CPU:\s*(\d+)", log)
    in_all = re.search(r"Total number of operations:\s*(\d+)", log)
    mapped_count = int(on_tpu.group(1)) if on_tpu else None
    total_count = int(in_all.group(1)) if in_all else None
    if total_count is None and on_tpu and on_cpu:
        total_count = int(on_tpu.group(1)) + int(on_cpu.group(1))
    return mapped_count, total_count
