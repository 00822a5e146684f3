"""Finding the inference runtimes and the Edge TPU delegate, without importing numpy.

Shared by fact detection (what loads on this device) and edgefleet.inference (running models),
so both give the same answer and the same reason when something is missing.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

EDGETPU_LIBRARY = "libedgetpu.so.1"
LITERT_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


class RuntimeUnavailable(RuntimeError):
    """The model cannot run here: no runtime, or no allowed target loads. Says which and why."""


def litert_module(import_module: Callable[[str], ModuleType] = importlib.import_module
                  ) -> ModuleType:
    """The LiteRT interpreter module: ai-edge-litert if installed, else tflite-runtime."""
    errors = []
    for name in LITERT_MODULES:
        try:
            return import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise RuntimeUnavailable("litert: unavailable: " + "; ".join(errors))


def load_edgetpu_delegate(module: ModuleType,
                          load_library: Callable[[str], object] = ctypes.CDLL) -> Any:
    """The Edge TPU delegate through LiteRT's delegate API, or RuntimeUnavailable saying why."""
    # Loading the library first gives the plain dlopen error and keeps LiteRT's Delegate from
    # half-constructing, whose __del__ then prints a spurious traceback.
    try:
        load_library(EDGETPU_LIBRARY)
    except OSError as error:
        raise RuntimeUnavailable(" ".join(str(error).split())) from None
    try:
        return module.load_delegate(EDGETPU_LIBRARY)
    except Exception as error:
        # The library is there but no TPU answered (stick unplugged, driver missing, TPU busy).
        raise RuntimeUnavailable(" ".join(str(error).split())) from None
