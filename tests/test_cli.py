"""The operator CLI and the agent's facts command, run for real on the shipped profiles and the
committed fake roots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.cli import main
from edgefleet.contract import DeviceFacts, decode

FAKEROOTS = Path(__file__).parent / "fakeroots"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env={"COLUMNS": "200", **(env or {})})
    return result.exit_code, result.output


def test_profiles_list_shows_every_shipped_profile() -> None:
    code, out = run("profiles", "list")
    assert code == 0
    for name in ("coral-usb-rpi4", "coral-pcie", "coral-devboard", "jetson-nano",
                 "jetson-orin-nano", "rpi4", "rpi5", "x86-64"):
        assert name in out


def test_a_broken_profile_folder_is_a_clean_error_naming_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "rpi9.toml").write_text('name = "rpi9"\ndescription = "x"\narch = "aarch64"\n'
                                        'memory_mb = "lots"\n')
    code, out = run("profiles", "list", "--dir", str(tmp_path))
    assert code == 1
    assert "rpi9.toml" in out and "memory_mb" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(("root", "profile"), [("coral-devboard", "coral-devboard"),
                                               ("rpi5", "rpi5"), ("jetson-nano", "jetson-nano")])
def test_hardware_detect_matches_a_fake_root(root: str, profile: str) -> None:
    code, out = run("hardware", "detect", "--root", str(FAKEROOTS / root), "--no-probe")
    assert code == 0
    assert f"profile       │ {profile}" in out


def test_hardware_detect_flags_unknown_hardware_with_exit_code_2() -> None:
    code, out = run("hardware", "detect", "--root", str(FAKEROOTS / "unknown-riscv"),
                    "--no-probe")
    assert code == 2
    assert "unknown hardware" in out


def test_hardware_detect_reports_the_runtimes_that_really_load_here() -> None:
    code, out = run("hardware", "detect", "--root", str(FAKEROOTS / "x86-64"))
    assert code == 0
    assert "CPUExecutionProvider" in out
    assert "edgetpu: unavailable" in out  # no Edge TPU on this machine, and it says so


def test_hardware_survey_matches_every_committed_fake_root_in_one_table() -> None:
    roots = sorted(p for p in FAKEROOTS.iterdir() if p.is_dir())
    code, out = run("hardware", "survey", *map(str, roots))
    assert code == 0
    assert "1 root(s) matched no profile" in out  # unknown-riscv
    for line in out.splitlines():
        if "coral-usb-rpi4-unflashed" in line:
            assert "│ coral-usb-rpi4 " in line and "1a6e:089a" in line


def test_topics_prints_every_channel_and_command() -> None:
    code, out = run("topics", "--root", "acme", "--device", "pi-1")
    assert code == 0
    for topic in ("acme/dev/pi-1/telemetry", "acme/dev/pi-1/cmd/deploy",
                  "acme/dev/pi-1/cmd/rollback", "acme/dev/pi-1/artifact/chunk"):
        assert topic in out


def test_agent_facts_prints_a_facts_message_the_contract_decodes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "facts", "--root", str(FAKEROOTS / "coral-pcie"),
         "--device-id", "coral-pcie-01"], capture_output=True, check=True).stdout
    facts = decode(DeviceFacts, out)
    assert facts.device_id == "coral-pcie-01"
    assert facts.profile == "coral-pcie"
    assert {r.name for r in facts.runtimes} == {"onnxruntime", "litert"}


def test_agent_facts_refuses_a_device_id_that_would_break_the_topic_tree() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "facts", "--device-id", "a/b",
                           "--no-probe"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "device id" in proc.stderr
