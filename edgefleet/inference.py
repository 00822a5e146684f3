"""One interface over the inference runtimes: load a model file, run a batch, say what runs.

Backends: onnxruntime (execution providers in the order asked, among those that load) and LiteRT
(`ai_edge_litert`, else `tflite_runtime`) with the Edge TPU delegate (`libedgetpu.so.1`) when it
loads. Nothing pretends: `execution` names what actually ran, and a missing accelerator is either
refused or a CPU fallback that says so. The agent runs models through this and the controller
measures variants through it, so both see the same behaviour.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from edgefleet.contract.manifest import CPU_TARGETS, Runtime, RuntimeRequirement
from edgefleet.runtimes import RuntimeUnavailable, litert_module, load_edgetpu_delegate


class LoadedModel(Protocol):
    execution: str                 # what actually runs, e.g. "litert/edgetpu"
    fallback_reason: str           # why it is not on its first target, "" when it is
    fixed_batch: int | None        # a model compiled for one batch size (TFLite: 1)

    def predict(self, x: np.ndarray) -> np.ndarray: ...


@dataclass
class OnnxModel:
    session: Any
    input_name: str
    execution: str
    fallback_reason: str
    fixed_batch: int | None = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        return np.asarray(out, dtype=np.float32)


@dataclass
class LiteRtModel:
    interpreter: Any
    execution: str
    fallback_reason: str
    fixed_batch: int | None = 1

    def __post_init__(self) -> None:
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._shape = tuple(int(d) for d in self._input["shape"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Runs sample by sample (the model has a fixed batch of 1), quantizing as it declares."""
        rows = [self._run_one(sample[None]) for sample in x]
        return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0,), np.float32)

    def _run_one(self, sample: np.ndarray) -> np.ndarray:
        if sample.shape != self._shape and sample.ndim == 4:
            # onnx2tf turns NCHW models into NHWC ones; callers keep the source's layout.
            sample = sample.transpose(0, 2, 3, 1)
        self.interpreter.set_tensor(self._input["index"], _quantize(sample, self._input))
        self.interpreter.invoke()
        return _dequantize(self.interpreter.get_tensor(self._output["index"]), self._output)


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    if dtype == np.float32:
        return x.astype(np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x / scale + zero_point)
    return np.asarray(np.clip(q, info.min, info.max), dtype=dtype)


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if y.dtype == np.float32:
        return y
    scale, zero_point = detail["quantization"]
    return np.asarray((y.astype(np.float32) - zero_point) * scale, dtype=np.float32)


def load_model(path: Path, requirement: RuntimeRequirement, *, threads: int | None = None,
               import_module: Callable[[str], ModuleType] = importlib.import_module
               ) -> LoadedModel:
    """Loads a model for its required runtime, on the first allowed target that loads."""
    if requirement.runtime is Runtime.ONNXRUNTIME:
        return _load_onnx(path, requirement, threads, import_module)
    return _load_litert(path, requirement, threads, import_module)


def _allowed(requirement: RuntimeRequirement, cpu: str) -> list[str]:
    targets = list(requirement.targets) or [cpu]
    if requirement.cpu_fallback and cpu not in targets:
        targets.append(cpu)
    return targets


def _load_onnx(path: Path, requirement: RuntimeRequirement, threads: int | None,
               import_module: Callable[[str], ModuleType]) -> LoadedModel:
    try:
        ort = import_module("onnxruntime")
    except ImportError as exc:
        raise RuntimeUnavailable(f"onnxruntime: unavailable: {exc}") from None
    available = set(ort.get_available_providers())
    wanted = _allowed(requirement, "CPUExecutionProvider")
    providers = [p for p in wanted if p in available]
    if not providers:
        raise RuntimeUnavailable(f"onnxruntime: none of {', '.join(wanted)} is available "
                                 f"(have {', '.join(sorted(available))})")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    running = session.get_providers()[0]
    reason = "" if running == wanted[0] else (
        f"{wanted[0]}: unavailable here; running on {running}")
    return OnnxModel(session, session.get_inputs()[0].name, f"onnxruntime/{running}", reason)


def _load_litert(path: Path, requirement: RuntimeRequirement, threads: int | None,
                 import_module: Callable[[str], ModuleType]) -> LoadedModel:
    module = litert_module(import_module)
    problems: list[str] = []
    for target in _allowed(requirement, "cpu"):
        delegates: Sequence[Any] = []
        if target == "edgetpu":
            try:
                delegates = [load_edgetpu_delegate(module)]
            except RuntimeUnavailable as exc:
                problems.append(f"edgetpu: unavailable: {exc}")
                continue
        elif target not in CPU_TARGETS:
            problems.append(f"{target}: not a LiteRT target")
            continue
        interpreter = module.Interpreter(model_path=str(path), experimental_delegates=delegates,
                                         num_threads=threads or os.cpu_count() or 1)
        interpreter.allocate_tensors()
        return LiteRtModel(interpreter, f"litert/{target}", "; ".join(problems))
    raise RuntimeUnavailable("litert: no allowed target loads: " + "; ".join(problems))
