"""Parameters and multiply-accumulates of an ONNX graph, from its shapes.

Counts what dominates small vision models (Conv, Gemm, MatMul); other ops are cheap next to
them and are not counted. Works on FP32 and on QDQ-quantized graphs (it follows the weight
through DequantizeLinear).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class GraphStats:
    params: int
    macs: int


def graph_stats(model: onnx.ModelProto) -> GraphStats:
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, array in weights.items():
        shapes[name] = tuple(array.shape)
    # A quantized weight reaches Conv through DequantizeLinear; its shape is the weight's.
    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:
            shapes[node.output[0]] = shapes[node.input[0]]

    # Parameters: the weights and biases that feed the counted ops, directly or through a
    # DequantizeLinear, each once (scales and zero points are not parameters).
    counted: set[str] = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            for name in node.input[1:]:
                source = producer.get(name)
                if source is not None and source.op_type == "DequantizeLinear":
                    name = source.input[0]
                if name in weights:
                    counted.add(name)
    params = sum(int(weights[name].size) for name in counted)
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0])
        if out is None:
            continue
        if node.op_type in ("Conv", "QLinearConv"):
            w = shapes.get(node.input[1] if node.op_type == "Conv" else node.input[3])
            if w is not None:  # out [N, Cout, H, W] x (Cin/group * kh * kw)
                macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if a is not None:
                macs += int(np.prod(out)) * int(a[-1])
    return GraphStats(params=params, macs=macs)

