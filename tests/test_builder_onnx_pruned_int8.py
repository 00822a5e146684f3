"""The `onnx-pruned-int8` builder end to end on the demo model: a smaller INT8 file that the
device-side loader runs on the CPU within a point of the FP32 model, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from controller.variants.builders import onnx_int8, onnx_pruned_int8
from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.graph_stats import graph_stats
from controller.variants.source import EvalData, SourceModel, load_data, load_source
from edgefleet.contract import FileFormat, Runtime, RuntimeRequirement, VariantKind
from edgefleet.inference import load_model

DIGITS = Path(__file__).resolve().parent.parent / "artifacts" / "digits"
CPU = RuntimeRequirement(runtime=Runtime.ONNXRUNTIME, targets=("CPUExecutionProvider",))


@pytest.fixture(scope="module")
def source() -> SourceModel:
    return load_source(DIGITS / "digits.fp32.onnx")


@pytest.fixture(scope="module")
def data(source: SourceModel) -> EvalData:
    return load_data(DIGITS / "digits.data.npz", source)


@pytest.fixture(scope="module")
def built(source: SourceModel, data: EvalData, tmp_path_factory: pytest.TempPathFactory
          ) -> BuiltVariant:
    return onnx_pruned_int8.build(source, data, tmp_path_factory.mktemp("pruned-int8"))


def accuracy(path: Path, data: EvalData) -> float:
    loaded = load_model(path, CPU)
    return float(np.mean(loaded.predict(data.eval_x).argmax(axis=1) == data.eval_y))


def test_builds_an_onnx_file_for_onnxruntime_on_the_cpu(built: BuiltVariant) -> None:
    assert built.kind is VariantKind.ONNX_PRUNED_INT8 is onnx_pruned_int8.KIND
    assert built.path.name == "digits.onnx-pruned-int8.onnx"
    assert built.path.is_file()
    assert built.file_format is FileFormat.ONNX
    assert built.runtime == CPU


def test_the_file_is_int8_qdq_with_the_source_input_and_output(built: BuiltVariant) -> None:
    model = onnx.load(str(built.path))

    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    int8 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert len(int8) >= 4                            # the four layers' weights at least
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_loads_on_the_cpu_and_loses_at_most_one_point(
        built: BuiltVariant, source: SourceModel, data: EvalData) -> None:
    loaded = load_model(built.path, CPU)

    assert loaded.execution == "onnxruntime/CPUExecutionProvider"
    assert loaded.fallback_reason == ""
    assert accuracy(built.path, data) >= accuracy(source.path, data) - 0.01


def test_reports_the_pruned_graphs_params_and_macs_before_and_after(
        built: BuiltVariant, source: SourceModel) -> None:
    before = graph_stats(source.load())
    pruned = onnx.load(str(built.path.parent / "digits.pruned-fp32.onnx"))

    assert (built.params, built.macs) == (graph_stats(pruned).params, graph_stats(pruned).macs)
    assert built.params is not None and built.params < before.params
    assert built.macs is not None and 2 * built.macs <= before.macs
    assert built.notes[0] == ("pruned: params 38,282→9,802, MACs 337,536→86,848 "
                              "(3.9\u00d7 fewer); kept conv1 8/16, conv2 16/32, fc1 32/64")


def test_the_file_describes_the_pruned_model_not_the_source(built: BuiltVariant) -> None:
    props = {p.key: p.value for p in onnx.load(str(built.path)).metadata_props}

    assert props["name"] == "digits"
    assert props["parameters"] == str(built.params)
    assert props["macs_per_image"] == str(built.macs)
    assert props["pruned"] == built.notes[0].removeprefix("pruned: ")
    assert "eval_accuracy" not in props


def one_layer_source(tmp_path: Path) -> tuple[SourceModel, EvalData]:
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "only.weight")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "only.weight"], ["y"], transB=1)], "one-layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [weight])
    path = tmp_path / "one.fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))
    x, y = np.ones((8, 4), np.float32), np.zeros(8, np.int64)
    return load_source(path), EvalData(path=tmp_path / "one.npz", calib_x=x, calib_y=y,
                                       eval_x=x, eval_y=y)


def test_a_model_with_nothing_to_prune_fails_with_one_line_saying_so(tmp_path: Path) -> None:
    source, data = one_layer_source(tmp_path)

    with pytest.raises(BuildError, match=r"cannot prune one\.fp32\.onnx: no prunable pair") as info:
        onnx_pruned_int8.build(source, data, tmp_path)
    assert "\n" not in str(info.value)


def test_a_quantizer_failure_becomes_a_one_line_build_error(
        source: SourceModel, data: EvalData, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(src: Path, dst: Path, calib_x: np.ndarray, input_name: str) -> None:
        raise RuntimeError("calibration diverged\nstack details")

    monkeypatch.setattr(onnx_int8, "quantize_static_int8", broken)

    few = EvalData(path=data.path, calib_x=data.calib_x[:20], calib_y=data.calib_y[:20],
                   eval_x=data.eval_x, eval_y=data.eval_y)
    with pytest.raises(BuildError) as info:
        onnx_pruned_int8.build(source, few, tmp_path)
    assert str(info.value) == ("static INT8 quantization of the pruned model failed: "
                               "RuntimeError: calibration diverged")
