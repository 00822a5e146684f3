"""Profile files: every shipped one loads, and a broken one is reported by file and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edgefleet.contract.manifest import Runtime
from edgefleet.contract.messages import VariantKind
from edgefleet.hardware import (
    Accelerator,
    ProfileError,
    default_profile_dir,
    load_profile,
    load_profiles,
)
from edgefleet.hardware.loading import PROFILES_ENV, packaged_profile_dir

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
SHIPPED = ("coral-devboard", "coral-pcie", "coral-usb-rpi4", "jetson-nano", "jetson-orin-nano",
           "rpi4", "rpi5", "x86-64")

CPU_FIRST = ["onnx-int8", "onnx-pruned-int8", "onnx-fp32"]
EDGETPU = {Runtime.LITERT: ("edgetpu", "cpu"), Runtime.ONNXRUNTIME: ("CPUExecutionProvider",)}
CUDA = {Runtime.ONNXRUNTIME: ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                              "CPUExecutionProvider")}
CPU_ONLY = {Runtime.ONNXRUNTIME: ("CPUExecutionProvider",), Runtime.LITERT: ("cpu",)}
PI_ORDER = ["onnx-pruned-int8", "onnx-int8", "tflite-int8", "onnx-fp32"]

# name: (arch, accelerator, prefers, runtime -> targets)
EXPECTED_SHIPPED = {
    "coral-usb-rpi4": ("aarch64", Accelerator.EDGETPU_USB, ["tflite-int8", *CPU_FIRST], EDGETPU),
    "coral-pcie": ("x86_64", Accelerator.EDGETPU_PCIE, ["tflite-int8", *CPU_FIRST], EDGETPU),
    "coral-devboard": ("aarch64", Accelerator.EDGETPU_PCIE, ["tflite-int8", *CPU_FIRST], EDGETPU),
    "jetson-nano": ("aarch64", Accelerator.NVIDIA_GPU, ["onnx-fp16", "onnx-fp32", "onnx-int8"],
                    CUDA),
    "jetson-orin-nano": ("aarch64", Accelerator.NVIDIA_GPU,
                         ["onnx-fp16", "onnx-fp32", "onnx-int8"], CUDA),
    "rpi4": ("aarch64", Accelerator.NONE, PI_ORDER, CPU_ONLY),
    "rpi5": ("aarch64", Accelerator.NONE, PI_ORDER, CPU_ONLY),
    "x86-64": ("x86_64", Accelerator.NONE,
               ["onnx-int8", "onnx-fp32", "onnx-pruned-int8", "tflite-int8"], CPU_ONLY),
}

VALID = textwrap.dedent("""\
    name = "sample"
    description = "A board for tests"
    arch = "aarch64"
    memory_mb = 4096
    accelerator = "none"
    prefers = ["onnx-int8", "onnx-fp32"]

    [[runtimes]]
    runtime = "onnxruntime"
    targets = ["CPUExecutionProvider"]

    [limits]
    max_model_bytes = 67108864
    memory_budget_mb = 1024

    [identify]
    arch = ["aarch64"]
    device_tree_model = ["Sample Board"]
    """)


def write_profile(directory: Path, text: str, stem: str = "sample") -> Path:
    path = directory / f"{stem}.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the shipped profiles ------------------------------------------------------------------------

def test_the_shipped_profiles_are_exactly_the_expected_set() -> None:
    assert tuple(load_profiles(PROFILES_DIR)) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_profile_loads_and_declares_what_its_hardware_runs(name: str) -> None:
    profile = load_profile(PROFILES_DIR / f"{name}.toml")
    arch, accelerator, prefers, targets = EXPECTED_SHIPPED[name]
    assert profile.name == name
    assert profile.description
    assert profile.arch == arch
    assert profile.accelerator is accelerator
    assert [kind.value for kind in profile.prefers] == prefers
    assert {s.runtime: s.targets for s in profile.runtimes} == targets
    assert profile.identify.condition_count >= 1
    assert 0 < profile.limits.memory_budget_mb < profile.memory_mb
    assert profile.limits.max_model_bytes > 0


def test_every_runtime_a_preferred_kind_needs_is_declared() -> None:
    # A profile that prefers TFLite but cannot run LiteRT would be offered variants it can't load.
    for profile in load_profiles(PROFILES_DIR).values():
        for kind in profile.prefers:
            runtime = Runtime.LITERT if kind is VariantKind.TFLITE_INT8 else Runtime.ONNXRUNTIME
            assert profile.runtime_targets(runtime), (profile.name, kind)


def test_load_profiles_returns_profiles_sorted_by_name(tmp_path: Path) -> None:
    for stem in ("zeta", "alpha", "mid"):
        write_profile(tmp_path, VALID.replace('name = "sample"', f'name = "{stem}"'), stem)
    assert list(load_profiles(tmp_path)) == ["alpha", "mid", "zeta"]


# --- broken profiles -----------------------------------------------------------------------------

BROKEN = {
    "missing field": (VALID.replace('arch = "aarch64"\n', "", 1),
                      "arch", "missing required field"),
    "missing nested field": (VALID.replace("memory_budget_mb = 1024\n", ""),
                             "limits.memory_budget_mb", "missing required field"),
    "wrong type": (VALID.replace("max_model_bytes = 67108864", 'max_model_bytes = "64 MiB"'),
                   "limits.max_model_bytes", "expected int, got str"),
    "float for an int": (VALID.replace("memory_mb = 4096", "memory_mb = 4.5"),
                         "memory_mb", "expected int, got float"),
    "unknown top-level field": (VALID.replace("memory_mb = 4096", "memory_mb = 4096\ngpu = true"),
                                "gpu", "unknown field"),
    "unknown nested field": (VALID + 'serial = ["1234"]\n', "identify.serial", "unknown field"),
    "unknown variant kind": (VALID.replace('"onnx-fp32"]', '"tflite-int4"]'),
                             "prefers[1]", "unknown variant kind 'tflite-int4'"),
    "unknown accelerator": (VALID.replace('accelerator = "none"', 'accelerator = "tpu"'),
                            "accelerator", "invalid value 'tpu' (expected one of: none, "),
    "unknown runtime": (VALID.replace('runtime = "onnxruntime"', 'runtime = "tensorflow"'),
                        "runtimes[0].runtime", "invalid value 'tensorflow'"),
    "wrong type in a list": (VALID.replace('arch = ["aarch64"]', "arch = [64]"),
                             "identify.arch[0]", "expected str, got int"),
    "name differs from file": (VALID.replace('name = "sample"', 'name = "rpi4"'),
                               "name", "'rpi4' does not match the file name 'sample'"),
}


@pytest.mark.parametrize(("text", "field", "message"), BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_profile_names_the_file_and_the_field(tmp_path: Path, text: str, field: str,
                                                       message: str) -> None:
    path = write_profile(tmp_path, text)
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    error = raised.value
    assert (error.path, error.field) == (path, field)
    assert message in error.message
    assert str(error).startswith(f"{path}: field '{field}': ")


def test_the_error_reads_as_the_operator_sees_it(tmp_path: Path) -> None:
    path = write_profile(tmp_path, BROKEN["wrong type"][0])
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    assert str(raised.value) == f"{path}: field 'limits.max_model_bytes': expected int, got str"


def test_bad_toml_syntax_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write_profile(tmp_path, VALID.replace("memory_mb = 4096", "memory_mb 4096"))
    with pytest.raises(ProfileError) as raised:
        load_profile(path)
    assert raised.value.line == 4
    assert raised.value.field is None
    assert str(raised.value).startswith(f"{path}: line 4: invalid TOML: ")


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sample.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ProfileError, match="not UTF-8") as raised:
        load_profile(path)
    assert raised.value.path == path


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ProfileError, match="cannot read") as raised:
        load_profile(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_load_profiles_names_the_broken_file_among_good_ones(tmp_path: Path) -> None:
    write_profile(tmp_path, VALID)
    broken = write_profile(tmp_path, BROKEN["wrong type"][0].replace("sample", "zzz"), "zzz")
    with pytest.raises(ProfileError) as raised:
        load_profiles(tmp_path)
    assert raised.value.path == broken


def test_duplicate_names_are_rejected_even_when_only_the_case_differs(tmp_path: Path) -> None:
    first = write_profile(tmp_path, VALID.replace('name = "sample"', 'name = "RPi4"'), "RPi4")
    second = write_profile(tmp_path, VALID.replace('name = "sample"', 'name = "rpi4"'), "rpi4")
    with pytest.raises(ProfileError) as raised:
        load_profiles(tmp_path)
    assert (raised.value.path, raised.value.field) == (second, "name")
    assert f"duplicate profile name 'rpi4' (also in {first})" in str(raised.value)


def test_a_folder_without_profiles_is_an_error_not_an_empty_fleet(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"no profile files") as raised:
        load_profiles(tmp_path / "nowhere")
    assert raised.value.path == tmp_path / "nowhere"


# --- where profiles are found --------------------------------------------------------------------

def test_the_environment_variable_chooses_the_profile_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    assert default_profile_dir() == tmp_path


def test_a_checkout_uses_its_own_profiles_folder_installed_editable_or_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Not installed: the checkout's profiles/; installed editable (as CI does): the package
    # edgefleet.profiles, which setuptools maps to that same folder.
    monkeypatch.delenv(PROFILES_ENV, raising=False)
    assert default_profile_dir().resolve() == PROFILES_DIR.resolve()
    assert tuple(load_profiles()) == SHIPPED


def test_an_installed_profile_package_is_found_by_import(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fleetprofiles_under_test"
    package.mkdir()
    (package / "__init__.py").write_text('"""Profiles."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert packaged_profile_dir(package.name) is None     # a package with no profiles
    write_profile(package, VALID)
    assert packaged_profile_dir(package.name) == package
    assert packaged_profile_dir("no_such_package_here") is None
