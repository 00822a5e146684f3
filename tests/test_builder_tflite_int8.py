"""The tflite-int8 (Coral) builder on the demo model, for real: onnx2tf and TensorFlow's
quantizer, the file read back with tflite_inspect, run with LiteRT and scored against the FP32
model in onnxruntime. Also the flatbuffer reader and the Edge TPU op table on their own, and
the compiler step with a stand-in `edgetpu_compiler` (the real one is an x86-64 Debian package
from Google's apt repository; where it is installed, the real-build tests check its result).

Needs the TFLite tooling: `.ci/install-tflite` installs it.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnxruntime as ort
import pytest

from controller.variants.builders import tflite_int8
from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.edgetpu_ops import EDGETPU_OPS, describe_marks, mark_ops
from controller.variants.source import EvalData, SourceModel, load_data, load_source, sha256_file
from controller.variants.tflite_inspect import (
    TfliteFormatError,
    inspect_tflite,
    inspect_tflite_bytes,
    schema_module,
)
from edgefleet.contract import FileFormat, Runtime, RuntimeRequirement, VariantKind
from edgefleet.inference import load_model
from edgefleet.runtimes import RuntimeUnavailable
from tests.variants_helpers import DATA, SOURCE

ENV_NAMES = ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")


@dataclass(frozen=True)
class ProcessState:
    recursion_limit: int
    warning_filters: tuple[object, ...]
    env: tuple[str | None, ...]

    @classmethod
    def now(cls) -> ProcessState:
        return cls(sys.getrecursionlimit(), tuple(warnings.filters),
                   tuple(os.environ.get(name) for name in ENV_NAMES))


@dataclass(frozen=True)
class Build:
    variant: BuiltVariant
    source: SourceModel
    data: EvalData
    source_sha_before: str
    state_before: ProcessState
    state_after: ProcessState


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Build:
    source = load_source(SOURCE)
    data = load_data(DATA, source)
    sha_before = sha256_file(SOURCE)
    before = ProcessState.now()
    variant = tflite_int8.build(source, data, tmp_path_factory.mktemp("tflite"))
    return Build(variant, source, data, sha_before, before, ProcessState.now())


STAND_IN_COMPILER = """#!/bin/sh
# Stand-in for edgetpu_compiler in tests: copies the model where the real one writes its output
# and prints a log in the real one's format (-s prints the per-operator table).
set -e
[ "$1" = "-s" ] && [ "$2" = "-o" ] || { echo "usage: edgetpu_compiler -s -o OUT MODEL"; exit 2; }
out=$3 model=$4
stem=$(basename "$model" .tflite)
unmapped="Operation is otherwise supported, but not mapped due to some unspecified limitation"
cp "$model" "$out/${stem}_edgetpu.tflite"
cat <<EOF
Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 12 ms.

Input model: $model
Output model: $out/${stem}_edgetpu.tflite
Number of Edge TPU subgraphs: 1
Total number of operations: 7
Operation log: $out/${stem}_edgetpu.log

Operator                       Count      Status

CONV_2D                        2          Mapped to Edge TPU
MAX_POOL_2D                    1          Mapped to Edge TPU
TRANSPOSE                      1          $unmapped
RESHAPE                        1          Mapped to Edge TPU
FULLY_CONNECTED                2          Mapped to Edge TPU
EOF
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(scope="module")
def built_uint8_with_stand_in_compiler(tmp_path_factory: pytest.TempPathFactory) -> BuiltVariant:
    tmp = tmp_path_factory.mktemp("tflite-uint8")
    compiler = _executable(tmp / "edgetpu_compiler", STAND_IN_COMPILER)
    workdir = tmp / "work"
    workdir.mkdir()
    source = load_source(SOURCE)
    return tflite_int8.build(source, load_data(DATA, source), workdir, io_dtype="uint8",
                             compiler=str(compiler))


def _fp32_predictions(source: SourceModel, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(source.path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {source.input_name: x})[0]).argmax(axis=1)


# --- the real build --------------------------------------------------------------------------

def test_the_variant_is_a_litert_tflite_for_edgetpu_then_cpu(built: Build) -> None:
    variant = built.variant
    assert variant.kind is VariantKind.TFLITE_INT8
    assert variant.path.name == "digits.tflite-int8.tflite"
    assert variant.path.is_file()
    assert variant.file_format is FileFormat.TFLITE
    assert variant.runtime == RuntimeRequirement(runtime=Runtime.LITERT,
                                                 targets=("edgetpu", "cpu"), cpu_fallback=True)
    assert (variant.params, variant.macs) == (38_282, 337_536)   # the source's, from its README


def test_the_file_itself_is_full_integer_with_a_fixed_batch_of_one(built: Build) -> None:
    graph = inspect_tflite(built.variant.path)
    assert graph.full_integer, graph.integer_problems
    assert graph.input_dtypes == ("INT8",) and graph.output_dtypes == ("INT8",)
    assert graph.input_shapes == ((1, 8, 8, 1),)      # NHWC, batch 1, no dynamic dimension
    assert graph.output_shapes == ((1, 10),)


def test_every_op_is_on_coral_s_edge_tpu_list_and_the_notes_say_so(built: Build) -> None:
    graph = inspect_tflite(built.variant.path)
    assert {"CONV_2D", "FULLY_CONNECTED"} <= set(graph.operators)
    assert not {"QUANTIZE", "DEQUANTIZE"} & set(graph.operators)
    assert all(mark.supported for mark in mark_ops(graph.operators))
    assert describe_marks(mark_ops(graph.operators)) in built.variant.notes
    assert "all on Coral's Edge TPU op list" in "\n".join(built.variant.notes)
    for op in graph.operators:
        assert op in built.variant.log


def test_without_an_edge_tpu_it_runs_on_the_litert_cpu_and_says_why(built: Build) -> None:
    model = load_model(built.variant.path, built.variant.runtime)
    assert model.execution == "litert/cpu"
    assert "libedgetpu" in model.fallback_reason
    assert model.fixed_batch == 1


def test_accuracy_stays_within_one_point_of_the_fp32_model(built: Build) -> None:
    x, y = built.data.eval_x, built.data.eval_y
    fp32 = _fp32_predictions(built.source, x)
    int8 = load_model(built.variant.path, built.variant.runtime).predict(x).argmax(axis=1)
    fp32_accuracy = float((fp32 == y).mean())
    assert fp32_accuracy > 0.97
    assert float((int8 == y).mean()) >= fp32_accuracy - 0.01
    assert float((int8 == fp32).mean()) >= 0.98


def test_the_notes_say_whether_the_edge_tpu_compiler_ran(built: Build) -> None:
    compiled = built.variant.path.with_name("digits.tflite-int8_edgetpu.tflite")
    if shutil.which("edgetpu_compiler") is None:
        assert tflite_int8.NOT_COMPILED_NOTE in built.variant.notes
        assert not compiled.exists()
        assert "edgetpu_compiler:" not in built.variant.log
    else:
        note = next(n for n in built.variant.notes if n.startswith("compiled for the Edge TPU"))
        assert compiled.name in note
        assert compiled.is_file()
        assert "Edge TPU Compiler" in built.variant.log
        assert tflite_int8.NOT_COMPILED_NOTE not in built.variant.notes


def test_the_source_file_is_left_as_it_was(built: Build) -> None:
    # onnx2tf rewrites the file it converts; the builder hands it a copy.
    assert sha256_file(SOURCE) == built.source_sha_before


def test_onnx2tf_s_process_wide_settings_are_undone(built: Build) -> None:
    assert built.state_after == built.state_before


def test_uint8_input_and_output_are_selectable(
        built_uint8_with_stand_in_compiler: BuiltVariant) -> None:
    variant = built_uint8_with_stand_in_compiler
    assert variant.measured_as is not None
    uncompiled, portable = variant.measured_as
    graph = inspect_tflite(uncompiled)
    assert graph.full_integer, graph.integer_problems
    assert graph.input_dtypes == ("UINT8",) and graph.output_dtypes == ("UINT8",)
    source = load_source(SOURCE)
    data = load_data(DATA, source)
    predictions = load_model(uncompiled, portable).predict(data.eval_x).argmax(axis=1)
    assert float((predictions == data.eval_y).mean()) > 0.97


def test_a_compiled_model_ships_for_the_edge_tpu_only_and_is_measured_uncompiled(
        built_uint8_with_stand_in_compiler: BuiltVariant) -> None:
    variant = built_uint8_with_stand_in_compiler
    assert variant.path.name == "digits.tflite-int8_edgetpu.tflite" and variant.path.is_file()
    assert variant.runtime.targets == ("edgetpu",) and not variant.runtime.cpu_fallback
    assert ("compiled for the Edge TPU: 6 of 7 ops mapped (digits.tflite-int8_edgetpu.tflite)"
            in variant.notes)
    assert tflite_int8.NOT_COMPILED_NOTE not in variant.notes
    assert "Edge TPU Compiler version" in variant.log
    assert variant.measured_as is not None
    assert variant.measured_as[0].name == "digits.tflite-int8.tflite"
    assert variant.measured_as[1].cpu_fallback
    with pytest.raises(RuntimeUnavailable, match="edgetpu: unavailable"):
        load_model(variant.path, variant.runtime)  # no Edge TPU here, and no pretending


# --- failures ----------------------------------------------------------------------------------

def test_a_valid_onnx_model_onnx2tf_cannot_convert_is_a_build_error(tmp_path: Path) -> None:
    image = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])
    pooled = onnx.helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT,
                                                ["N", 1, 2, 2])
    node = onnx.helper.make_node("LpPool", ["image"], ["pooled"], kernel_shape=[2, 2],
                                 strides=[2, 2])
    graph = onnx.helper.make_graph([node], "lppool", [image], [pooled])
    path = tmp_path / "lppool.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              str(path))
    source = load_source(path)                 # passes the pipeline's own source checks
    x = np.zeros((4, 1, 4, 4), np.float32)
    labels = np.zeros(4, np.int64)
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(BuildError, match=r"onnx2tf cannot convert lppool\.onnx: LpPool") as info:
        tflite_int8.build(source, EvalData(tmp_path / "d.npz", x, labels, x, labels), workdir)
    assert "\n" not in str(info.value)
    assert not list(workdir.iterdir())           # the SavedModel scratch folder is gone


def test_a_converted_model_that_is_not_full_integer_is_a_build_error(
        built: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands in for a quantizer that leaves float tensors behind (a float fallback).
    float_model = _float_tflite()
    monkeypatch.setattr(tflite_int8, "quantize_full_integer", lambda *args: float_model)
    with pytest.raises(BuildError, match=r"not full-integer: .*FLOAT32") as info:
        tflite_int8.build(built.source, built.data, tmp_path)
    assert "\n" not in str(info.value)


def test_missing_onnx2tf_is_a_build_error_naming_the_install_script(
        built: Build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx2tf", None)     # makes `import onnx2tf` fail
    with pytest.raises(BuildError, match=r"onnx2tf is not installed.*\.ci/install-tflite"):
        tflite_int8.build(built.source, built.data, tmp_path)


def test_a_failing_compiler_is_a_build_error_with_its_last_line(
        built: Build, tmp_path: Path) -> None:
    compiler = _executable(tmp_path / "edgetpu_compiler",
                           "#!/bin/sh\necho 'Edge TPU Compiler version 16.0'\n"
                           "echo 'ERROR: Unsupported data type in custom op handler' >&2\n"
                           "exit 1\n")
    with pytest.raises(BuildError, match=r"exit 1.*Unsupported data type"):
        tflite_int8.compile_for_edgetpu(built.variant.path, tmp_path, str(compiler))


# --- the compiler's log --------------------------------------------------------------------

def test_compiler_counts_come_from_the_summary_lines_without_the_table() -> None:
    log = ("Total number of operations: 12\n"
           "Number of operations that will run on Edge TPU: 10\n"
           "Number of operations that will run on CPU: 2\n")
    assert tflite_int8.parse_compiler_counts(log) == (10, 12)
    assert tflite_int8.parse_compiler_counts(log.split("\n", 1)[1]) == (10, 12)
    assert tflite_int8.parse_compiler_counts("Model compiled successfully.") == (None, None)


# --- tflite_inspect and the Edge TPU op table --------------------------------------------------

def _float_tflite() -> bytes:
    """A tiny float32 TFLite model (dense + relu), made with TensorFlow without quantization."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def dense(x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(tf.matmul(x, tf.ones([4, 2])) + 1.0)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [dense.get_concrete_function()], dense)
    model: bytes = converter.convert()
    return model


def test_a_float_tflite_model_is_not_full_integer(tmp_path: Path) -> None:
    path = tmp_path / "float.tflite"
    path.write_bytes(_float_tflite())
    graph = inspect_tflite(path)
    assert not graph.full_integer
    assert graph.operators == ("FULLY_CONNECTED",)
    assert graph.input_dtypes == ("FLOAT32",)
    assert any("FLOAT32" in problem for problem in graph.integer_problems)
    assert "input 0 is FLOAT32, not INT8 or UINT8" in graph.integer_problems


def test_a_file_that_is_not_a_tflite_flatbuffer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TfliteFormatError, match="not a TFLite flatbuffer"):
        inspect_tflite_bytes(SOURCE.read_bytes()[:4096], "digits.fp32.onnx")
    with pytest.raises(TfliteFormatError):
        inspect_tflite_bytes(b"\x00" * 4 + b"TFL3" + b"\xff" * 8, "garbage")


def test_every_edge_tpu_table_entry_is_a_tflite_builtin_op() -> None:
    builtin = {name for name in vars(schema_module().BuiltinOperator) if not name.startswith("_")}
    assert set(EDGETPU_OPS) <= builtin
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(EDGETPU_OPS)


def test_dequantize_is_supported_only_as_the_last_op_and_unlisted_ops_are_named() -> None:
    last = mark_ops(["CONV_2D", "DEQUANTIZE"])
    assert [m.supported for m in last] == [True, True]
    inner = mark_ops(["DEQUANTIZE", "CONV_2D"])
    assert [m.supported for m in inner] == [False, True]
    marks = mark_ops(["CONV_2D", "GATHER", "CUSTOM:FlexErf", "CONV_2D"])
    assert [m.supported for m in marks] == [True, False, False, True]
    assert describe_marks(marks) == (
        "ops: CONV_2D x2, GATHER, CUSTOM:FlexErf; not on Coral's Edge TPU op list (would run "
        "on the CPU): CUSTOM:FlexErf, GATHER")
