"""What a device is and what it can run, read from the machine itself.

``read_hardware`` looks only at files under a root directory, so tests point it at a fake root
and the agent at ``/``. ``probe_runtimes`` really imports the runtimes and loads the Edge TPU
delegate, because "installed" and "loads" differ on edge devices.
"""

from __future__ import annotations

import ctypes
import importlib
import platform
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

from edgefleet.contract.messages import HardwareFacts, RuntimeFact
from edgefleet.runtimes import RuntimeUnavailable, load_edgetpu_delegate

# A /proc or /sys file is small; the cap keeps a root that points somewhere odd from hanging us.
_MAX_FILE_BYTES = 4 * 1024 * 1024
_USB_ID = re.compile(r"^[0-9a-f]{4}$")

# ARM's "CPU part" numbers for the cores edge boards use; "model name" on ARM is a generic
# "ARMv8 Processor rev 1 (v8l)", so the part number is the better name.
_ARM_IMPLEMENTER = "0x41"
_ARM_CORES = {
    "0xb76": "ARM1176", "0xc07": "Cortex-A7", "0xc08": "Cortex-A8", "0xc09": "Cortex-A9",
    "0xc0f": "Cortex-A15", "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
    "0xd4b": "Cortex-A78C",
}


# --- hardware from a filesystem root ------------------------------------------------------------

def read_hardware(root: Path = Path("/"), machine: str | None = None) -> HardwareFacts:
    """The hardware facts the files under ``root`` state; a missing or garbled file is no fact.

    ``machine`` overrides the architecture (uname's machine). Without it the architecture comes
    from ``proc/sys/kernel/arch``, and from this Python's own uname only when ``root`` is ``/``:
    a fake root must not inherit the host's architecture.
    """
    cpuinfo = _parse_cpuinfo(_read_text(root / "proc/cpuinfo") or "")
    return HardwareFacts(
        arch=machine or _read_arch(root),
        machine_model=_read_device_tree_model(root) or _first(cpuinfo, "Model"),
        cpu_model=_cpu_model(cpuinfo),
        cpu_cores=max(1, sum(1 for key, value in cpuinfo if key == "processor"
                             and value.isdigit())),
        memory_mb=_read_memory_mb(root),
        os_release=_read_pretty_name(root),
        usb_ids=_read_usb_ids(root),
        apex_devices=tuple(f"/dev/{node.name}" for node in sorted(root.glob("dev/apex_*"))),
        tegra_release=_first_line(_read_text(root / "etc/nv_tegra_release")),
    )


def _read_text(path: Path) -> str | None:
    """A small file's text, or None if it is missing, unreadable or not UTF-8."""
    try:
        with path.open("rb") as file:
            return file.read(_MAX_FILE_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _first_line(text: str | None) -> str | None:
    if text is None:
        return None
    line = text.strip("\x00 \t\r\n").split("\n", 1)[0].strip()
    return line or None


def _read_arch(root: Path) -> str:
    arch = _first_line(_read_text(root / "proc/sys/kernel/arch"))
    if arch is not None:
        return arch
    if root.resolve() == Path("/").resolve():
        return platform.machine() or "unknown"
    return "unknown"


def _read_device_tree_model(root: Path) -> str | None:
    # The device tree stores strings NUL-terminated.
    text = _read_text(root / "proc/device-tree/model")
    return _first_line(text.replace("\x00", "")) if text is not None else None


def _parse_cpuinfo(text: str) -> list[tuple[str, str]]:
    """(key, value) for every "key : value" line, in file order (keys repeat per processor)."""
    pairs = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            pairs.append((key.strip(), value.strip()))
    return pairs


def _first(pairs: Iterable[tuple[str, str]], wanted: str) -> str | None:
    return next((value for key, value in pairs if key == wanted and value), None)


def _cpu_model(cpuinfo: list[tuple[str, str]]) -> str | None:
    """x86 "model name"; on ARM the core from "CPU part"; else "Hardware" or RISC-V "uarch"."""
    implementer, part = _first(cpuinfo, "CPU implementer"), _first(cpuinfo, "CPU part")
    if implementer == _ARM_IMPLEMENTER and part in _ARM_CORES:
        return f"ARM {_ARM_CORES[part]}"
    return (_first(cpuinfo, "model name") or _first(cpuinfo, "Hardware")
            or _first(cpuinfo, "uarch"))


def _read_memory_mb(root: Path) -> int:
    for line in (_read_text(root / "proc/meminfo") or "").splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "MemTotal:" and fields[1].isdigit() \
                and fields[2] == "kB":
            return int(fields[1]) // 1024
    return 0


def _read_pretty_name(root: Path) -> str | None:
    for line in (_read_text(root / "etc/os-release") or "").splitlines():
        key, equals, value = line.partition("=")
        if equals and key.strip() == "PRETTY_NAME":
            return value.strip().strip("\"'") or None
    return None


def _read_usb_ids(root: Path) -> tuple[str, ...]:
    """Every "vendor:product" under sys/bus/usb/devices; interfaces have no ids and are skipped."""
    ids = set()
    for vendor_file in root.glob("sys/bus/usb/devices/*/idVendor"):
        vendor = (_first_line(_read_text(vendor_file)) or "").lower()
        product = (_first_line(_read_text(vendor_file.with_name("idProduct"))) or "").lower()
        if _USB_ID.match(vendor) and _USB_ID.match(product):
            ids.add(f"{vendor}:{product}")
    return tuple(sorted(ids))


# --- runtimes, by importing them ----------------------------------------------------------------

ImportModule = Callable[[str], ModuleType]
LoadLibrary = Callable[[str], object]

# Newest first: ai-edge-litert replaced tflite-runtime, which older devices (Coral Dev Board,
# Python 3.7 on Mendel) still have.
_LITERT_MODULES = ("ai_edge_litert", "tflite_runtime")


def probe_runtimes(import_module: ImportModule = importlib.import_module,
                   load_library: LoadLibrary = ctypes.CDLL) -> tuple[RuntimeFact, ...]:
    """onnxruntime and LiteRT as they load here: version, usable targets, and what is missing.

    Run it before the agent loads a model: opening the Edge TPU delegate claims the TPU (one
    process at a time) and makes a USB Accelerator load its firmware.
    """
    return (_probe_onnxruntime(import_module), _probe_litert(import_module, load_library))


def _describe(error: BaseException) -> str:
    """One line: what failed and why, as the error itself says it."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _probe_onnxruntime(import_module: ImportModule) -> RuntimeFact:
    # A broken install fails in many ways besides ImportError (missing .so, numpy ABI), and a
    # probe that raises would take the agent down with it.
    try:
        onnxruntime = import_module("onnxruntime")
        providers = tuple(str(p) for p in onnxruntime.get_available_providers())
    except Exception as error:
        return RuntimeFact(name="onnxruntime", available=False, detail=_describe(error))
    return RuntimeFact(name="onnxruntime", available=True,
                       version=getattr(onnxruntime, "__version__", None),
                       module="onnxruntime", targets=providers)


def _probe_litert(import_module: ImportModule, load_library: LoadLibrary) -> RuntimeFact:
    failures = []
    for module_name in _LITERT_MODULES:
        try:
            interpreter = import_module(f"{module_name}.interpreter")
            package = import_module(module_name)
        except Exception as error:
            failures.append(f"{module_name}: {_describe(error)}")
            continue
        edgetpu_problem = _edgetpu_problem(interpreter, load_library)
        return RuntimeFact(
            name="litert", available=True, version=getattr(package, "__version__", None),
            module=module_name,
            targets=("cpu",) if edgetpu_problem else ("edgetpu", "cpu"),
            missing=(f"edgetpu: unavailable: {edgetpu_problem}",) if edgetpu_problem else (),
        )
    return RuntimeFact(name="litert", available=False, detail="; ".join(failures))


def _edgetpu_problem(interpreter: ModuleType, load_library: LoadLibrary) -> str | None:
    """Why the Edge TPU delegate does not load through ``interpreter``, or None if it does."""
    try:
        load_edgetpu_delegate(interpreter, load_library)
    except RuntimeUnavailable as error:
        return str(error)
    return None
