"""Runs the real agent (`python -m agent.cli run`) as a process against a test broker, so tests
can kill it with SIGKILL at any moment and start it again on the same state directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.contract.signing import key_id, public_key_to_pem

ROOT = Path(__file__).resolve().parents[1]
FAKEROOTS = ROOT / "tests" / "fakeroots"
REPLAY = ROOT / "artifacts" / "digits" / "digits.data.npz"


def write_trust(directory: Path, *keys: Ed25519PrivateKey) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for key in keys:
        (directory / f"{key_id(key.public_key())}.pem").write_bytes(
            public_key_to_pem(key.public_key()))
    return directory


def agent_config(path: Path, *, device_id: str, port: int, topic_root: str, keys_dir: Path,
                 state_dir: Path, fakeroot: str = "x86-64", extra: str = "") -> Path:
    path.write_text(f"""
device_id = "{device_id}"
state_dir = "{state_dir}"

[broker]
host = "127.0.0.1"
port = {port}
topic_root = "{topic_root}"
keepalive_s = 5
reconnect_min_s = 0.2
reconnect_max_s = 1.0

[trust]
keys_dir = "{keys_dir}"

[inference]
source = "replay"
replay_file = "{REPLAY}"
pace_s = 0.002

[telemetry]
interval_s = 0.5
heartbeat_interval_s = 1.0

[install]
chunk_timeout_s = 2.0
download_timeout_s = 60.0

[hardware]
root = "{FAKEROOTS / fakeroot}"
{extra}
""")
    return path


@dataclass
class AgentProcess:
    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> AgentProcess:
        self.starts += 1
        out = self.log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        code = self.proc.poll()
        assert code is not None, "the agent did not exit"
        return code
