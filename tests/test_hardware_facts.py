"""Fact detection: committed fake roots, planted garbage, and the runtimes on this machine."""

from __future__ import annotations

import ctypes
import importlib
import platform
from pathlib import Path
from types import ModuleType

import pytest
from msgspec.structs import replace

from edgefleet.contract.messages import HardwareFacts, RuntimeFact
from edgefleet.hardware import probe_runtimes, read_hardware
from edgefleet.runtimes import EDGETPU_LIBRARY

FAKEROOTS = Path(__file__).parent / "fakeroots"

PI4_USB = ("1d6b:0002", "1d6b:0003", "2109:3431")
BOOKWORM = "Debian GNU/Linux 12 (bookworm)"
PI4 = HardwareFacts(arch="aarch64", machine_model="Raspberry Pi 4 Model B Rev 1.4",
                    cpu_model="ARM Cortex-A72", cpu_cores=4, memory_mb=3793,
                    os_release=BOOKWORM, usb_ids=PI4_USB)

EXPECTED = {
    "rpi4": PI4,
    "coral-usb-rpi4": replace(PI4, usb_ids=("18d1:9302", *PI4_USB)),
    "coral-usb-rpi4-unflashed": replace(PI4, usb_ids=("1a6e:089a", *PI4_USB)),
    "rpi5": HardwareFacts(arch="aarch64", machine_model="Raspberry Pi 5 Model B Rev 1.0",
                          cpu_model="ARM Cortex-A76", cpu_cores=4, memory_mb=8052,
                          os_release=BOOKWORM, usb_ids=("1d6b:0002", "1d6b:0003")),
    "coral-devboard": HardwareFacts(arch="aarch64", machine_model="Freescale i.MX8MQ Phanbell",
                                    cpu_model="ARM Cortex-A53", cpu_cores=4, memory_mb=996,
                                    os_release="Mendel GNU/Linux 5 (Eagle)",
                                    usb_ids=("1d6b:0002", "1d6b:0003"),
                                    apex_devices=("/dev/apex_0",)),
    "coral-pcie": HardwareFacts(arch="x86_64", machine_model=None,
                                cpu_model="Intel(R) Celeron(R) J4125 CPU @ 2.00GHz", cpu_cores=4,
                                memory_mb=7803, os_release=BOOKWORM,
                                usb_ids=("1d6b:0002", "1d6b:0003"),
                                apex_devices=("/dev/apex_0",)),
    "x86-64": HardwareFacts(arch="x86_64", machine_model=None,
                            cpu_model="Intel(R) Core(TM) i5-7500T CPU @ 2.70GHz", cpu_cores=4,
                            memory_mb=15921, os_release="Ubuntu 22.04.4 LTS",
                            usb_ids=("046d:c52b", "1d6b:0002", "1d6b:0003")),
    "jetson-nano": HardwareFacts(
        arch="aarch64", machine_model="NVIDIA Jetson Nano Developer Kit",
        cpu_model="ARM Cortex-A57", cpu_cores=4, memory_mb=3964, os_release="Ubuntu 18.04.6 LTS",
        usb_ids=("0bda:0411", "0bda:5411", "1d6b:0002", "1d6b:0003"),
        tegra_release="# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, "
                      "EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022"),
    "jetson-orin-nano": HardwareFacts(
        arch="aarch64", machine_model="NVIDIA Jetson Orin Nano Developer Kit",
        cpu_model="ARM Cortex-A78AE", cpu_cores=6, memory_mb=7441,
        os_release="Ubuntu 22.04.4 LTS",
        usb_ids=("0bda:0489", "0bda:5489", "1d6b:0002", "1d6b:0003"),
        tegra_release="# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, "
                      "EABI: aarch64, DATE: Fri Jul 19 23:24:25 UTC 2024"),
    "unknown-riscv": HardwareFacts(arch="riscv64", machine_model="StarFive VisionFive 2 v1.3B",
                                   cpu_model="sifive,u74-mc", cpu_cores=4, memory_mb=7852,
                                   os_release="Debian GNU/Linux bookworm/sid",
                                   usb_ids=("1d6b:0002", "1d6b:0003", "2109:2817")),
}


def plant(root: Path, files: dict[str, bytes | None]) -> Path:
    """Write files under root; None makes a directory where a file is expected."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
    return root


# --- fake roots ----------------------------------------------------------------------------------

def test_every_fake_root_has_expected_facts() -> None:
    assert {root.name for root in FAKEROOTS.iterdir() if root.is_dir()} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_fake_root_reads_as_its_hardware(name: str) -> None:
    assert read_hardware(FAKEROOTS / name) == EXPECTED[name]


def test_the_machine_argument_overrides_the_architecture() -> None:
    assert read_hardware(FAKEROOTS / "rpi4", machine="armv7l").arch == "armv7l"


def test_an_empty_root_gives_no_facts_and_not_the_hosts_architecture(tmp_path: Path) -> None:
    assert read_hardware(tmp_path) == HardwareFacts(arch="unknown")


def test_the_real_root_reads_this_machine() -> None:
    facts = read_hardware()
    assert facts.arch == platform.machine()
    assert facts.cpu_cores >= 1
    assert facts.memory_mb > 0


# --- missing and garbled files -------------------------------------------------------------------

GARBAGE: dict[str, tuple[dict[str, bytes | None], str, object]] = {
    "meminfo without a number": ({"proc/meminfo": b"MemTotal: lots kB\n"}, "memory_mb", 0),
    "meminfo in other units": ({"proc/meminfo": b"MemTotal: 4 GB\n"}, "memory_mb", 0),
    "meminfo not text": ({"proc/meminfo": b"\xff\xfe\x00MemTotal"}, "memory_mb", 0),
    "cpuinfo not text": ({"proc/cpuinfo": b"processor : 0\n\xff\xfe"}, "cpu_cores", 1),
    "cpuinfo without processors": ({"proc/cpuinfo": b"junk\n:::\n"}, "cpu_model", None),
    "unknown ARM core falls back to model name": (
        {"proc/cpuinfo": b"processor\t: 0\nmodel name\t: ARMv8 Processor rev 0 (v8l)\n"
                         b"CPU implementer\t: 0x41\nCPU part\t: 0xfff\n"},
        "cpu_model", "ARMv8 Processor rev 0 (v8l)"),
    "non-ARM implementer falls back to Hardware": (
        {"proc/cpuinfo": b"processor\t: 0\nCPU implementer\t: 0x4e\nCPU part\t: 0x004\n"
                         b"Hardware\t: NVIDIA Carmel\n"},
        "cpu_model", "NVIDIA Carmel"),
    "device-tree model not text": ({"proc/device-tree/model": b"\xff\xfe\x00"},
                                   "machine_model", None),
    "device-tree model only a NUL": ({"proc/device-tree/model": b"\x00"},
                                     "machine_model", None),
    "device-tree model is a directory": ({"proc/device-tree/model": None},
                                         "machine_model", None),
    # Containers often lack /proc/device-tree but share the host's cpuinfo.
    "cpuinfo Model stands in for the device tree": (
        {"proc/cpuinfo": b"processor\t: 0\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"},
        "machine_model", "Raspberry Pi 5 Model B Rev 1.0"),
    "USB id not hex": ({"sys/bus/usb/devices/1-1/idVendor": b"zzzz\n",
                        "sys/bus/usb/devices/1-1/idProduct": b"9302\n"}, "usb_ids", ()),
    "USB vendor without product": ({"sys/bus/usb/devices/1-1/idVendor": b"18d1\n"},
                                   "usb_ids", ()),
    "USB interface without ids": ({"sys/bus/usb/devices/1-1:1.0/bInterfaceClass": b"ff\n"},
                                  "usb_ids", ()),
    "USB ids in upper case": ({"sys/bus/usb/devices/2-2/idVendor": b"18D1\n",
                               "sys/bus/usb/devices/2-2/idProduct": b"9302\n"},
                              "usb_ids", ("18d1:9302",)),
    "os-release without PRETTY_NAME": ({"etc/os-release": b"NAME=Debian\nID=debian\n"},
                                       "os_release", None),
    "os-release with single quotes": ({"etc/os-release": b"PRETTY_NAME='Alpine Linux v3.19'\n"},
                                      "os_release", "Alpine Linux v3.19"),
    "empty tegra release": ({"etc/nv_tegra_release": b"\n"}, "tegra_release", None),
    "empty arch file": ({"proc/sys/kernel/arch": b"\n"}, "arch", "unknown"),
    "apex is not a prefix of every name": ({"dev/apex": b"", "dev/apexx_0": b""},
                                           "apex_devices", ()),
}


@pytest.mark.parametrize(("files", "field", "expected"), GARBAGE.values(), ids=GARBAGE.keys())
def test_a_missing_or_garbled_file_is_an_absent_fact(tmp_path: Path, files: dict[str, bytes | None],
                                                     field: str, expected: object) -> None:
    assert getattr(read_hardware(plant(tmp_path, files)), field) == expected


# --- runtimes ------------------------------------------------------------------------------------

def edgetpu_library_loads() -> bool:
    try:
        ctypes.CDLL(EDGETPU_LIBRARY)
    except OSError:
        return False
    return True


def test_this_machine_reports_onnxruntime_litert_and_the_truth_about_the_edgetpu() -> None:
    import ai_edge_litert as litert
    import onnxruntime as ort

    onnxruntime_fact, litert_fact = probe_runtimes()
    assert onnxruntime_fact.name == "onnxruntime"
    assert onnxruntime_fact.available
    assert onnxruntime_fact.version == ort.__version__
    assert "CPUExecutionProvider" in onnxruntime_fact.targets
    assert (litert_fact.name, litert_fact.available, litert_fact.version, litert_fact.module) == (
        "litert", True, litert.__version__, "ai_edge_litert")
    if not edgetpu_library_loads():
        # The development and CI machines: no libedgetpu, said plainly.
        assert litert_fact.targets == ("cpu",)
        (missing,) = litert_fact.missing
        assert missing.startswith(f"edgetpu: unavailable: {EDGETPU_LIBRARY}")
    else:
        # A machine with libedgetpu: the delegate loads (a TPU answered) or says why not.
        assert ("edgetpu" in litert_fact.targets) != bool(litert_fact.missing)


class Imports:
    """The real import, except for names planted as failures or as stand-in modules.

    Stand-ins are for what cannot be real on this machine: tflite-runtime (replaced by
    ai-edge-litert) and an attached Edge TPU.
    """

    def __init__(self, *, missing: tuple[str, ...] = (),
                 modules: dict[str, ModuleType] | None = None) -> None:
        self.missing = missing
        self.modules = modules or {}
        self.asked: list[str] = []

    def __call__(self, name: str) -> ModuleType:
        self.asked.append(name)
        if name.split(".")[0] in self.missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if name in self.modules:
            return self.modules[name]
        return importlib.import_module(name)


def litert_like(name: str, version: str, delegate_error: Exception | None) -> dict[str, ModuleType]:
    package = ModuleType(name)
    package.__version__ = version  # type: ignore[attr-defined]
    interpreter = ModuleType(f"{name}.interpreter")

    def load_delegate(library: str) -> object:
        if delegate_error is not None:
            raise delegate_error
        return object()

    interpreter.load_delegate = load_delegate  # type: ignore[attr-defined]
    return {name: package, f"{name}.interpreter": interpreter}


def loads_any_library(name: str) -> object:
    return object()


def test_litert_falls_back_to_tflite_runtime() -> None:
    imports = Imports(missing=("ai_edge_litert",),
                      modules=litert_like("tflite_runtime", "2.14.0", delegate_error=None))
    _, litert_fact = probe_runtimes(import_module=imports)
    assert imports.asked[-3:] == ["ai_edge_litert.interpreter", "tflite_runtime.interpreter",
                                  "tflite_runtime"]
    assert (litert_fact.available, litert_fact.module, litert_fact.version) == (
        True, "tflite_runtime", "2.14.0")
    if not edgetpu_library_loads():
        assert litert_fact.targets == ("cpu",)
        assert litert_fact.missing[0].startswith(f"edgetpu: unavailable: {EDGETPU_LIBRARY}")


def test_edgetpu_is_a_target_when_its_delegate_loads() -> None:
    imports = Imports(missing=("ai_edge_litert",),
                      modules=litert_like("tflite_runtime", "2.14.0", delegate_error=None))
    _, litert_fact = probe_runtimes(import_module=imports, load_library=loads_any_library)
    assert (litert_fact.targets, litert_fact.missing) == (("edgetpu", "cpu"), ())


def test_an_edgetpu_library_without_a_tpu_says_why_in_its_own_words() -> None:
    unplugged = ValueError(f"Failed to load delegate from {EDGETPU_LIBRARY}\n")
    imports = Imports(missing=("ai_edge_litert",),
                      modules=litert_like("tflite_runtime", "2.14.0", delegate_error=unplugged))
    _, litert_fact = probe_runtimes(import_module=imports, load_library=loads_any_library)
    assert litert_fact.targets == ("cpu",)
    assert litert_fact.missing == (
        f"edgetpu: unavailable: Failed to load delegate from {EDGETPU_LIBRARY}",)


def test_no_litert_at_all_is_unavailable_with_both_import_errors() -> None:
    _, litert_fact = probe_runtimes(
        import_module=Imports(missing=("ai_edge_litert", "tflite_runtime")))
    assert not litert_fact.available
    assert litert_fact.module is None
    assert litert_fact.targets == ()
    assert "ai_edge_litert: ModuleNotFoundError" in litert_fact.detail
    assert "tflite_runtime: ModuleNotFoundError" in litert_fact.detail


def test_onnxruntime_that_fails_to_import_is_unavailable_with_the_error() -> None:
    onnxruntime_fact, _ = probe_runtimes(import_module=Imports(missing=("onnxruntime",)))
    assert onnxruntime_fact == RuntimeFact(
        name="onnxruntime", available=False,
        detail="ModuleNotFoundError: No module named 'onnxruntime'")


def test_a_runtime_that_breaks_while_importing_does_not_break_the_probe() -> None:
    def broken(name: str) -> ModuleType:
        raise OSError("libonnxruntime.so.1: cannot open shared object file")

    onnxruntime_fact, litert_fact = probe_runtimes(import_module=broken)
    assert onnxruntime_fact.detail == "OSError: libonnxruntime.so.1: cannot open shared object file"
    assert not onnxruntime_fact.available
    assert not litert_fact.available
