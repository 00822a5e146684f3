"""`edgefleet demo`: a whole fleet on this machine, on real parts, in a few minutes.

Mosquitto with its own config on a free loopback port, the controller on SQLite in a working
folder, and agent processes whose fake filesystem roots make them present as different
hardware. The demo registers the digits model, installs v1, rolls v2 out in stages, then rolls
out a deliberately worse v3 that the accuracy gate stops, and shows the fleet back on v2. Every
process it starts is stopped at the end, on Ctrl-C and on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
FAKEROOTS = ROOT / "tests" / "fakeroots"
DIGITS = ROOT / "artifacts" / "digits"
# Who the demo devices pretend to be, in the order devices are added.
DEMO_HARDWARE = ("coral-usb-rpi4", "coral-devboard", "jetson-orin-nano", "rpi4", "rpi5",
                 "x86-64")
TOPIC_ROOT = "demo/edgefleet"


class DemoFailed(RuntimeError):
    pass


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise DemoFailed("mosquitto is not installed: run `bash .ci/demo` (it installs it with "
                         "apt-get), or `apt-get install mosquitto`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every child the demo starts, stopped in reverse order whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        child = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.children.append((name, child))
        return child

    def check(self) -> None:
        for name, child in self.children:
            if child.poll() is not None:
                raise DemoFailed(f"{name} exited with {child.returncode}; see "
                                 f"{self.logs / (name + '.log')}")

    def stop_all(self) -> None:
        for _, child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, child in reversed(self.children):
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def degraded_model(source: Path, out: Path, seed: int = 7) -> Path:
    """v3: the same network with its last layer scrambled: it loads, runs fast, and is wrong
    far more often. Deterministic, so every demo shows the same gate decision."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for index, init in enumerate(model.graph.initializer):
        if init.name == "fc2.weight":
            weights = numpy_helper.to_array(init).copy()
            scrambled = weights + rng.normal(0, 2.5 * weights.std(), weights.shape)
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(scrambled.astype(weights.dtype), init.name))
    for prop in model.metadata_props:
        if prop.key == "version":
            prop.value = "3"
    onnx.save(model, str(out))
    return out


class Demo:
    def __init__(self, workdir: Path, devices: int, fast: bool, console: Console) -> None:
        self.workdir = workdir
        self.devices = devices
        self.fast = fast
        self.out = console
        self.home = workdir / "controller"
        self.procs = Processes(workdir / "logs")

    # --- plumbing ----------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self.out.rule(f"[bold]{title}")

    def cli(self, *args: str) -> None:
        from controller.cli import main

        try:
            main.main([*args, "--home", str(self.home)], prog_name="edgefleet",
                      standalone_mode=False)
        except click.ClickException as exc:
            raise DemoFailed(f"edgefleet {' '.join(args)}: {exc.format_message()}") from None
        except SystemExit as exc:
            if exc.code:
                raise DemoFailed(f"edgefleet {' '.join(args)} exited with {exc.code}") from None

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        from controller.db.engine import make_engine

        engine = make_engine(f"sqlite:///{self.home / 'fleet.db'}")
        try:
            with engine.connect() as conn:
                return [dict(r) for r in conn.execute(text(sql), params).mappings()]
        finally:
            engine.dispose()

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float,
             show: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        shown = 0.0
        while not predicate():
            self.procs.check()
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")
            if show is not None and time.monotonic() - shown > 3:
                show()
                shown = time.monotonic()
            time.sleep(0.5)

    # --- the scenario ------------------------------------------------------------------------

    def run(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "logs").mkdir(parents=True)
        try:
            self._run()
        finally:
            self.procs.stop_all()

    def _run(self) -> None:
        self.step("1. A broker, a controller and a fleet on this machine")
        port = free_port()
        # The fleet CA, the controller's certificate and the signing key; then a Mosquitto
        # config in which every client needs a certificate from that CA and each device may
        # only speak in its own subtree (what a production fleet runs, too).
        self.cli("init", "--topic-root", TOPIC_ROOT)
        self.cli("broker-config", "--port", str(port),
                 *(["--user", "root"] if os.geteuid() == 0 else []))
        conf = self.home / "broker" / "mosquitto.conf"
        self.procs.start("mosquitto", [find_mosquitto(), "-c", str(conf)])
        self._wait_port(port)
        self.out.print(f"mosquitto on 127.0.0.1:{port}: TLS only, client certificates "
                       f"required, per-device ACL ({conf})")
        build = self._buildable_kinds()
        self.step("2. Register the digits model: build and measure every variant")
        self.cli("models", "add", str(DIGITS / "digits.fp32.onnx"), "--data",
                 str(DIGITS / "digits.data.npz"), "--version", "1", *build)
        self.cli("models", "add", str(DIGITS / "digits.fp32.onnx"), "--data",
                 str(DIGITS / "digits.data.npz"), "--version", "2", *build)
        worse = degraded_model(DIGITS / "digits.fp32.onnx", self.workdir / "digits-v3.onnx")
        self.cli("models", "add", str(worse), "--data", str(DIGITS / "digits.data.npz"),
                 "--name", "digits", "--version", "3", "--only", "onnx-fp32",
                 "--only", "onnx-int8")
        self.cli("variants", "list")
        self._start_controller_and_agents(port)
        self.cli("devices", "list")

        self.step("3. Install v1 everywhere")
        self._rollout("v1 install", 1, "--groups", "100")
        self.step("4. Rotate the signing key: devices take the new key list over MQTT")
        self.cli("keys", "rotate")
        self.cli("keys", "list")
        self.out.print("v2 is signed with the new key: a device that had not taken the "
                       "new list would refuse it, and one that did now refuses the old key")
        self.step("5. Roll out v2 in stages: a canary, then half, then the rest")
        v2 = self._rollout("v2 staged", 2, "--groups", self._stages(), "--soak",
                           "1" if self.fast else "4", "--min-accuracy", "0.9",
                           "--max-error-rate", "0.01", "--max-latency-ratio", "5",
                           "--min-samples", "50")
        self.step("6. Roll out v3, which is worse on real inputs: the accuracy gate stops it")
        v3 = self._rollout("v3 worse", 3, "--groups", self._stages(), "--soak",
                           "1" if self.fast else "4", "--min-accuracy", "0.9",
                           "--min-samples", "50", "--on-gate-failure", "rollback",
                           expect=("failed", "paused"))
        self.wait("the canary to be back on v2", lambda: all(
            r["model_version"] == 2 for r in self.query("SELECT model_version FROM fleet_status")),
            90)
        self.step("7. Where the fleet stands")
        self.cli("fleet", "status")
        gate = self.query("SELECT detail FROM audit_log WHERE subject = :id AND action LIKE "
                          "'engine.gate%' ORDER BY id DESC LIMIT 1", id=v3)
        if gate:
            detail = gate[0]["detail"]
            detail = json.loads(detail) if isinstance(detail, str) else detail
            self.out.print("the gate's numbers: " + ", ".join(
                f"{k}={v}" for k, v in detail.items() if "accuracy" in k))
        db = self.home / "fleet.db"
        self.out.print(f"\nThe fleet database is {db}. Try:\n"
                       f"  sqlite3 {db} 'SELECT device_id, profile, model_version, "
                       "variant_kind, execution, p95_ms, accuracy FROM fleet_status;'\n"
                       f"  sqlite3 {db} 'SELECT rollout_id, group_name, state, targeted, "
                       "succeeded, failed FROM rollout_progress;'\n"
                       f"  sqlite3 {db} \"SELECT datetime(ts,'unixepoch'), action, detail FROM "
                       f"audit_log WHERE subject = '{v3}';\"\n"
                       f"Logs of every process are in {self.workdir / 'logs'}. "
                       f"(rollouts: {v2} succeeded, {v3} stopped by its gate)")

    def _buildable_kinds(self) -> list[str]:
        kinds = ["onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-pruned-int8"]
        try:
            import onnx2tf  # noqa: F401
            import tensorflow  # noqa: F401
        except ImportError:
            self.out.print("[yellow]tflite-int8 (Coral) is not built: TensorFlow and onnx2tf "
                           "are not installed (bash .ci/install-tflite adds them). Coral "
                           "devices get a CPU variant and say why.[/yellow]")
        else:
            kinds.append("tflite-int8")
        return [arg for kind in kinds for arg in ("--only", kind)]

    def _stages(self) -> str:
        canary = max(1, round(100 / self.devices))
        return f"{canary},50,100" if self.devices >= 3 else "50,100"

    def _start_controller_and_agents(self, port: int) -> None:
        self.procs.start("controller", [sys.executable, "-c",
                                        "from controller.cli import main; main()", "serve",
                                        "--home", str(self.home)])
        from controller.enrollment import amend_agent_config

        for index in range(self.devices):
            hardware = DEMO_HARDWARE[index % len(DEMO_HARDWARE)]
            device_id = f"{hardware}-{index + 1:02d}"
            bundle = self.workdir / "devices" / device_id
            self.cli("devices", "enroll", device_id, "--label", f"hardware={hardware}",
                     "--out", str(bundle))
            config = bundle / "agent.toml"
            amend_agent_config(config, _demo_agent_settings(bundle / "state",
                                                            FAKEROOTS / hardware))
            self.procs.start(device_id, [sys.executable, "-m", "agent.cli", "run", "--config",
                                         str(config)])
            self.out.print(f"agent {device_id}: presents as {hardware} (fake root "
                           f"{FAKEROOTS / hardware}); runs on this machine's real runtimes")
        self.wait("every agent to register", lambda: len(self.query(
            "SELECT id FROM devices WHERE profile IS NOT NULL")) == self.devices, 60)

    def _rollout(self, name: str, version: int, *options: str,
                 expect: tuple[str, ...] = ("succeeded",)) -> str:
        before = {r["id"] for r in self.query("SELECT id FROM rollouts")}
        self.cli("rollouts", "create", "--name", name, "--model", "digits", "--version",
                 str(version), "--watch", "2" if self.fast else "5", *options)
        rollout_id = next(r["id"] for r in self.query("SELECT id FROM rollouts")
                          if r["id"] not in before)
        self.cli("rollouts", "start", rollout_id)

        def state() -> str:
            rows = self.query("SELECT state FROM rollouts WHERE id = :id", id=rollout_id)
            return str(rows[0]["state"])

        self.wait(f"{rollout_id} to end", lambda: state() in (*expect, "succeeded", "failed",
                                                             "aborted", "paused"),
                  240, show=lambda: self._progress(rollout_id))
        self._progress(rollout_id)
        if state() not in expect:
            raise DemoFailed(f"{rollout_id} ended {state()}, expected {' or '.join(expect)}")
        return rollout_id

    def _progress(self, rollout_id: str) -> None:
        table = Table(title=f"{rollout_id}")
        for column in ("group", "state", "targeted", "succeeded", "failed", "pending"):
            table.add_column(column)
        for row in self.query("SELECT * FROM rollout_progress WHERE rollout_id = :id "
                              "ORDER BY group_position", id=rollout_id):
            table.add_row(str(row["group_name"]), str(row["group_state"]),
                          str(row["targeted"]), str(row["succeeded"]), str(row["failed"]),
                          str(row["pending"]))
        self.out.print(table)

    @staticmethod
    def _wait_port(port: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.1)
        raise DemoFailed(f"mosquitto did not listen on {port}")


def _demo_agent_settings(state: Path, root: Path) -> dict[str, dict[str, Any]]:
    """What the demo adds to each enrollment bundle's agent.toml."""
    return {
        "": {"state_dir": str(state)},
        "broker": {"reconnect_min_s": 0.5, "reconnect_max_s": 5.0},
        "inference": {"source": "replay", "replay_file": str(DIGITS / "digits.data.npz"),
                      "pace_s": 0.01},
        "telemetry": {"interval_s": 1.0, "heartbeat_interval_s": 5.0},
        # Six agents, a controller and a broker share this machine's cores: latency is noisy
        # here in a way it is not on a device, so the agents' own latency check is looser.
        "install": {"watch_max_latency_factor": 10.0},
        "hardware": {"root": str(root)},
    }


@contextlib.contextmanager
def _interrupts_as_failure() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        raise DemoFailed("interrupted") from None


@click.command()
@click.option("--devices", default=6, show_default=True, type=click.IntRange(1, 24))
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("edgefleet-demo"), show_default=True)
@click.option("--fast", is_flag=True, help="Shorter soak and watch windows (for tests).")
def demo(devices: int, workdir: Path, fast: bool) -> None:
    """Run a local demo fleet: broker, controller, agents, three rollouts."""
    console = Console()
    if not FAKEROOTS.is_dir():
        raise click.ClickException(f"{FAKEROOTS} not found: the demo runs from a checkout")
    started = time.monotonic()
    try:
        with _interrupts_as_failure():
            Demo(workdir.resolve(), devices, fast, console).run()
    except DemoFailed as exc:
        console.print(f"[red]demo failed: {exc}[/red]")
        sys.exit(1)
    console.print(f"[green]demo finished in {time.monotonic() - started:.0f} s[/green]")
