"""A seeded fleet home for the CLI tests (a pytest plugin, see conftest.py): devices stored the
way `edgefleet serve` stores them (ingest's writers fed real contract payloads, with hardware
facts read from the committed fake roots and matched to the shipped profiles), digits v1
registered, and the helpers those tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from controller.db import make_engine
from controller.db.ingest import FactsWriter, PresenceWriter, TelemetryWriter, WriteResult
from controller.settings import load_settings
from edgefleet.contract import (
    ActiveModel,
    DeviceFacts,
    LatencyStats,
    Presence,
    PresenceState,
    RuntimeFact,
    TelemetryBatch,
    VariantKind,
    encode,
)
from edgefleet.hardware import load_profiles, match_profile, read_hardware
from tests.cli_helpers import ok, query
from tests.variants_helpers import DATA, SOURCE

REPO = Path(__file__).resolve().parents[1]
FAKEROOTS = Path(__file__).parent / "fakeroots"
T0 = 1_795_000_000.0
SEQ0 = 1_795_000_000_000
# device id -> fake root it runs on; unknown-riscv matches no profile.
DEVICES = {"x86-0": "x86-64", "rpi4-1": "rpi4", "coral-2": "coral-usb-rpi4",
           "riscv-3": "unknown-riscv"}
RUNTIMES = (
    RuntimeFact(name="onnxruntime", available=True, version="1.17.3", module="onnxruntime",
                targets=("CPUExecutionProvider",)),
    RuntimeFact(name="litert", available=True, version="2.3.0", module="ai_edge_litert",
                targets=("cpu",), missing=("edgetpu: unavailable: libedgetpu.so.1 not found",)),
)
FP32_ONLY = ("--only", "onnx-fp32")
UNREACHABLE = "postgresql://postgres:hunter2@127.0.0.1:1/nowhere"


@pytest.fixture
def no_leftover_wal(tmp_path: Path) -> Iterator[None]:
    """Every engine a command opens is disposed: no SQLite connection outlives a test."""
    yield
    assert not list(tmp_path.rglob("*.db-shm")), "an engine was left open"


# --- running the CLI -----------------------------------------------------------------------------

def execute(home: Path, sql: str, **params: Any) -> None:
    engine = make_engine(load_settings(home).database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def count(home: Path, table: str, where: str = "1 = 1") -> int:
    return int(query(home, f"SELECT COUNT(*) AS n FROM {table} WHERE {where}")[0]["n"])


def files_under(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mode: a before/after picture."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a seeded fleet ------------------------------------------------------------------------------

def facts(device_id: str, root: str) -> DeviceFacts:
    hardware = read_hardware(FAKEROOTS / root)
    match = match_profile(hardware, load_profiles())
    return DeviceFacts(device_id=device_id, ts=T0, hardware=hardware, runtimes=RUNTIMES,
                       profile=match.profile.name if match.profile else None,
                       agent_version="0.1.0")


def window(device_id: str, n: int) -> TelemetryBatch:
    return TelemetryBatch(
        device_id=device_id, seq=SEQ0 + n, window_start=T0 + 10 * n, window_end=T0 + 10 * n + 10,
        model=ActiveModel(model_name="digits", model_version=1,
                          variant_kind=VariantKind.ONNX_FP32, artifact_id="digits-v1-onnx-fp32"),
        execution="onnxruntime/CPUExecutionProvider", inferences=500, errors=1,
        throughput_ips=50.0, latency=LatencyStats(p50_ms=0.5, p95_ms=0.75, p99_ms=1.0,
                                                  max_ms=2.0),
        labelled=400, accuracy=0.98, agreement=0.99, cpu_percent=11.5, rss_mb=60.0)


def seed_devices(home: Path) -> None:
    """Presence, facts and telemetry stored by ingest's writers, as `serve` stores them."""
    engine = make_engine(load_settings(home).database_url)
    try:
        online = [(d, encode(Presence(device_id=d, state=PresenceState.ONLINE, ts=T0,
                                      agent_version="0.1.0"))) for d in DEVICES]
        assert PresenceWriter(engine).write(online) == WriteResult(stored=len(DEVICES))
        found = [(d, encode(facts(d, root))) for d, root in DEVICES.items()]
        assert FactsWriter(engine).write(found) == WriteResult(stored=len(DEVICES))
        windows = [("x86-0", encode(window("x86-0", n))) for n in range(3)]
        assert TelemetryWriter(engine).write(windows) == WriteResult(stored=3)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def seeded_cli_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Initialised once per module: four devices (one of unknown hardware), telemetry for one,
    and digits v1 (onnx-fp32) registered. Tests work on copies of it."""
    home = tmp_path_factory.mktemp("template") / "home"
    ok("init", home=home)
    seed_devices(home)
    ok("models", "add", str(SOURCE), "--data", str(DATA), *FP32_ONLY, home=home)
    return home


@pytest.fixture
def empty_home(tmp_path: Path) -> Path:
    home = tmp_path / "empty"
    ok("init", home=home)
    return home


def create(home: Path, *extra: str) -> str:
    out = ok("rollouts", "create", "--name", "first", "--model", "digits", "--version", "1",
             *extra, home=home)
    return out.split()[1]
