"""What a .tflite file holds: its operators, its input and output tensors, and whether every
tensor an op touches is an integer, which the Edge TPU needs.

Reads the flatbuffer with the schema module generated from TFLite's schema.fbs, as shipped by
ai-edge-litert or TensorFlow, so it needs no interpreter and never runs the model.
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# Same generated code in both; ai-edge-litert is the smaller install, so it is tried first.
SCHEMA_MODULES = ("ai_edge_litert.schema_py_generated",
                  "tensorflow.lite.python.schema_py_generated")

# Tensor types a full-integer model may use: 8-bit activations and weights, int32 for biases
# and for the constant shapes and permutations of RESHAPE, TRANSPOSE and the like.
INTEGER_IO_TYPES = frozenset({"INT8", "UINT8"})
INTEGER_TENSOR_TYPES = INTEGER_IO_TYPES | {"INT32"}


class TfliteFormatError(ValueError):
    """The file is not a TFLite flatbuffer, or no schema module is installed to read it."""


@dataclass(frozen=True)
class TfliteGraph:
    operators: tuple[str, ...]            # builtin names in execution order; "CUSTOM:<code>"
    input_dtypes: tuple[str, ...]         # schema names, e.g. "INT8"
    input_shapes: tuple[tuple[int, ...], ...]   # -1 where the model leaves a dimension dynamic
    output_dtypes: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    integer_problems: tuple[str, ...]     # why it is not full-integer; empty when it is

    @property
    def full_integer(self) -> bool:
        return not self.integer_problems


def schema_module(import_module: Any = importlib.import_module) -> ModuleType:
    errors = []
    for name in SCHEMA_MODULES:
        try:
            module: ModuleType = import_module(name)
            return module
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise TfliteFormatError("no TFLite schema module to read .tflite files (install "
                            "ai-edge-litert or tensorflow): " + "; ".join(errors))


def inspect_tflite(path: Path) -> TfliteGraph:
    return inspect_tflite_bytes(path.read_bytes(), str(path))


def inspect_tflite_bytes(buf: bytes, label: str = "model") -> TfliteGraph:
    schema = schema_module()
    if len(buf) < 8 or not schema.Model.ModelBufferHasIdentifier(buf, 0):
        raise TfliteFormatError(f"{label}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        model = schema.Model.GetRootAs(buf, 0)
        if model.SubgraphsLength() == 0:
            raise ValueError("no subgraph")
        return _read(schema, model)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, struct.error) as exc:
        # A damaged buffer fails wherever the reader first follows a bad offset.
        raise TfliteFormatError(f"{label}: unreadable TFLite flatbuffer "
                                f"({type(exc).__name__}: {exc})") from None


def _names(enum_class: Any) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items()
            if not name.startswith("_") and isinstance(value, int)}


def _read(schema: ModuleType, model: Any) -> TfliteGraph:
    op_names = _names(schema.BuiltinOperator)
    type_names = _names(schema.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live in builtin_code; older files only fill deprecated_builtin_code.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = op_names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = f"CUSTOM:{(code.CustomCode() or b'').decode(errors='replace')}"
        codes.append(name)

    operators: list[str] = []
    problems: list[str] = []
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        flagged: set[int] = set()
        for o in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(o)
            name = codes[op.OpcodeIndex()]
            operators.append(name)
            if name.startswith("CUSTOM:"):
                kind = "a TensorFlow (Flex) op" if name.startswith("CUSTOM:Flex") else "custom"
                problems.append(f"{name[7:]} is {kind}, not a builtin op")
            tensors = [op.Inputs(j) for j in range(op.InputsLength())]
            tensors += [op.Outputs(j) for j in range(op.OutputsLength())]
            for index in tensors:
                if index < 0 or index in flagged:     # -1: an optional input left out
                    continue
                tensor = subgraph.Tensors(index)
                dtype = type_names.get(tensor.Type(), str(tensor.Type()))
                if dtype not in INTEGER_TENSOR_TYPES:
                    flagged.add(index)
                    problems.append(f"{name} uses {dtype} tensor "
                                    f"'{(tensor.Name() or b'').decode(errors='replace')}'")

    main = model.Subgraphs(0)
    inputs = [main.Tensors(main.Inputs(j)) for j in range(main.InputsLength())]
    outputs = [main.Tensors(main.Outputs(j)) for j in range(main.OutputsLength())]
    input_dtypes = tuple(type_names.get(t.Type(), str(t.Type())) for t in inputs)
    output_dtypes = tuple(type_names.get(t.Type(), str(t.Type())) for t in outputs)
    for role, dtypes in (("input", input_dtypes), ("output", output_dtypes)):
        problems += [f"{role} {j} is {dtype}, not INT8 or UINT8"
                     for j, dtype in enumerate(dtypes) if dtype not in INTEGER_IO_TYPES]
    return TfliteGraph(operators=tuple(operators), input_dtypes=input_dtypes,
                       input_shapes=tuple(_shape(t) for t in inputs),
                       output_dtypes=output_dtypes, output_shapes=tuple(_shape(t) for t in outputs),
                       integer_problems=tuple(problems))


def _shape(tensor: Any) -> tuple[int, ...]:
    # shape_signature keeps -1 for dynamic dimensions, where shape holds a placeholder 1.
    if not tensor.ShapeSignatureIsNone() and tensor.ShapeSignatureLength():
        return tuple(int(tensor.ShapeSignature(i)) for i in range(tensor.ShapeSignatureLength()))
    return tuple(int(tensor.Shape(i)) for i in range(tensor.ShapeLength()))
