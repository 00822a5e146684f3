"""Small ONNX models that misbehave in one way each, for the agent's and controller's tests:
NaN outputs, refused inputs, wrong output shapes, constant answers, slow answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def onnx_file(tmp: Path, name: str, nodes: list[onnx.NodeProto],
              inits: list[onnx.TensorProto], input_shape: list[str | int],
              output_shape: list[str | int] | None = None) -> Path:
    """A model from nodes; the output is [N, 10] unless said (None: left for the runtime)."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       output_shape if output_shape is not None else ["N", 10])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def nan_model(tmp: Path) -> Path:
    """Loads and runs, but every output is NaN: sqrt of a negative number."""
    return onnx_file(tmp, "nan", [
        helper.make_node("Flatten", ["image"], ["flat"]),
        helper.make_node("Abs", ["flat"], ["pos"]),
        helper.make_node("MatMul", ["pos", "w"], ["neg"]),
        helper.make_node("Sub", ["neg", "one"], ["below"]),
        helper.make_node("Sqrt", ["below"], ["logits"]),
    ], [onnx.numpy_helper.from_array(np.full((64, 10), -1.0, np.float32), "w"),
        onnx.numpy_helper.from_array(np.ones(1, np.float32), "one")], ["N", 1, 8, 8])


def raising_model(tmp: Path) -> Path:
    """Loads, but takes flat [N, 64] inputs: onnxruntime refuses every [N, 1, 8, 8] batch."""
    return onnx_file(tmp, "raising", [helper.make_node("MatMul", ["image", "w"], ["logits"])],
                     [onnx.numpy_helper.from_array(np.zeros((64, 10), np.float32), "w")],
                     ["N", 64])


def one_value_model(tmp: Path) -> Path:
    """Runs, but answers one number per input ([N]), not one score per class ([N, 10])."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["image", "axes"], ["logits"], keepdims=0)], "one",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N"])],
        [onnx.numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp / "one.onnx"
    onnx.save(model, str(path))
    return path


def pairs_model(tmp: Path) -> Path:
    """Runs, but answers [N, 10, 2]: one more axis than a classifier's scores."""
    return onnx_file(tmp, "pairs", [
        helper.make_node("Flatten", ["image"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["wide"]),
        helper.make_node("Reshape", ["wide", "shape"], ["logits"]),
    ], [onnx.numpy_helper.from_array(np.ones((64, 20), np.float32), "w"),
        onnx.numpy_helper.from_array(np.array([-1, 10, 2], np.int64), "shape")],
        ["N", 1, 8, 8], output_shape=["N", 10, 2])


def constant_model(tmp: Path) -> Path:
    """Always answers class 0."""
    bias = np.zeros(10, np.float32)
    bias[0] = 1.0
    return onnx_file(tmp, "constant", [
        helper.make_node("Flatten", ["image"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
    ], [onnx.numpy_helper.from_array(np.zeros((64, 10), np.float32), "w"),
        onnx.numpy_helper.from_array(bias, "b")], ["N", 1, 8, 8])


def slow_model(tmp: Path) -> Path:
    """Correct shape, finite output, but ~1,200x the demo model's work per inference (160
    512x512 MatMuls, ~42M MACs): a few ms even on a fast AVX2 core, where a tenth of that
    once stayed under the watch's 1 ms absolute margin."""
    rng = np.random.default_rng(0)
    square = (rng.standard_normal((512, 512)) / 23).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]),
             helper.make_node("MatMul", ["flat", "widen"], ["h0"])]
    for i in range(160):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "square"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", ["h160", "narrow"], ["logits"]))
    return onnx_file(tmp, "slow", nodes, [
        onnx.numpy_helper.from_array((rng.standard_normal((64, 512)) / 8).astype(np.float32),
                                     "widen"),
        onnx.numpy_helper.from_array(square, "square"),
        onnx.numpy_helper.from_array(rng.standard_normal((512, 10)).astype(np.float32),
                                     "narrow")], ["N", 1, 8, 8])
