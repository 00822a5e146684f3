"""Which TFLite operators Coral's Edge TPU supports, from Coral's documented table.

The table is "Supported operations" on coral.ai's "TensorFlow models on the Edge TPU" page, with
Coral's names mapped to TFLite builtin operator names and each op's known limitation kept. It is
a first look an operator can read before compiling, not a verdict: `edgetpu_compiler` decides
what really maps (it also checks shapes, sizes and the limitations below, and sends everything
after the first unmapped op to the CPU), and its log is the authority.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# TFLite builtin name -> the limitation Coral documents ("" when none). Coral's minimum-runtime
# column is left out: the compiler applies it for the runtime version it targets.
EDGETPU_OPS: dict[str, str] = {
    "ADD": "",
    "AVERAGE_POOL_2D": "no fused activation function",
    "CONCATENATION": "no fused activation function; a constant input must be all zeroes, with "
                     "only 2 inputs",
    "CONV_2D": "same dilation in x and y",
    "DEPTHWISE_CONV_2D": "no dilated kernels",
    "DEQUANTIZE": "only as the last op (a float output)",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": "default weights format only; one-dimensional output",
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    # Coral lists "LSTM" (unidirectional only); whether a fused UNIDIRECTIONAL_SEQUENCE_LSTM maps
    # is the compiler's call, so it is not listed.
    "LSTM": "unidirectional only",
    "MAXIMUM": "",
    "MAX_POOL_2D": "no fused activation function",
    "MEAN": "no reduction in the batch dimension",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "no packing in the batch dimension",
    "PAD": "no padding in the batch dimension",
    "PRELU": "alpha must be 1-dimensional",
    "QUANTIZE": "",
    "REDUCE_MAX": "not on the batch dimension",
    "REDUCE_MIN": "not on the batch dimension",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "large reshapes may not map",
    "RESIZE_BILINEAR": "3-dimensional input/output; may stay on the CPU to keep precision",
    "RESIZE_NEAREST_NEIGHBOR": "3-dimensional input/output; may stay on the CPU to keep precision",
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": "1-D input of at most 16,000 elements",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "no splitting in the batch dimension",
    "SQUARED_DIFFERENCE": "",
    "SQUEEZE": "",
    "STRIDED_SLICE": "all strides 1, no ellipsis or new-axis mask",
    "SUB": "",
    "SUM": "not on the batch dimension",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}


@dataclass(frozen=True)
class OpSupport:
    op: str                  # TFLite builtin name, or "CUSTOM:<code>"
    supported: bool          # on Coral's list (and, for DEQUANTIZE, in its one allowed place)
    limitation: str          # what Coral says may still keep it off the Edge TPU


def mark_ops(operators: Sequence[str]) -> tuple[OpSupport, ...]:
    """Marks each op of a model, in execution order, as on Coral's Edge TPU list or not."""
    marks = []
    for index, op in enumerate(operators):
        supported = op in EDGETPU_OPS
        if op == "DEQUANTIZE":
            supported = index == len(operators) - 1
        marks.append(OpSupport(op, supported, EDGETPU_OPS.get(op, "")))
    return tuple(marks)


def describe_marks(marks: Sequence[OpSupport]) -> str:
    """One line for a variant's notes: the ops, counted, and which are off Coral's list."""
    counts: dict[str, int] = {}
    for mark in marks:
        counts[mark.op] = counts.get(mark.op, 0) + 1
    ops = ", ".join(op if n == 1 else f"{op} x{n}" for op, n in counts.items())
    off = sorted({mark.op for mark in marks if not mark.supported})
    if not off:
        return f"ops: {ops}; all on Coral's Edge TPU op list"
    return (f"ops: {ops}; not on Coral's Edge TPU op list (would run on the CPU): "
            f"{', '.join(off)}")


def marks_table(marks: Sequence[OpSupport]) -> str:
    """The per-op table kept in the build log."""
    lines = [f"{'#':>3}  {'operator':<24} {'Edge TPU list':<14} limitation"]
    for index, mark in enumerate(marks):
        status = "listed" if mark.supported else "NOT listed"
        lines.append(f"{index:>3}  {mark.op:<24} {status:<14} {mark.limitation}".rstrip())
    return "\n".join(lines)
