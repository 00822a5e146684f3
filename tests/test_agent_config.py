"""agent.config: a complete config loads as written; every broken one is refused with an error that
names the file and the field, and the agent's command line exits before it connects anywhere.

(The shipped systemd/agent.toml.example is loaded in tests/test_systemd.py.)
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError, InputSource, load_config

ROOT = Path(__file__).resolve().parents[1]

FULL = """
device_id = "pi-0001"
state_dir = "/srv/edgefleet"

[broker]
host = "mqtt.example.internal"
port = 8883
keepalive_s = 15
topic_root = "acme/edgefleet"
ca_file = "/etc/edgefleet/tls/ca.pem"
cert_file = "/etc/edgefleet/tls/device.pem"
key_file = "/etc/edgefleet/tls/device.key"
username = "pi-0001"
password = "secret"
reconnect_min_s = 1.0
reconnect_max_s = 60.0

[trust]
keys_dir = "/etc/edgefleet/keys.d"

[inference]
source = "directory"
directory = "/srv/inbox"
batch_size = 4
pace_s = 0.01
threads = 2

[telemetry]
interval_s = 5.0
heartbeat_interval_s = 20.0
outbox_max_rows = 500
outbox_max_bytes = 1048576
outbox_max_age_s = 3600.0
max_inflight = 50

[install]
chunk_window = 4
chunk_timeout_s = 2.5
download_timeout_s = 120.0
smoke_samples = 16
smoke_max_latency_ms = 40.0
watch_max_error_rate = 0.05
watch_max_latency_factor = 2.0

[hardware]
root = "/tmp/fakeroot"
profile = "rpi4-cpu"
"""

# A config that loads; each broken case below changes one thing in it.
MINIMAL = """
device_id = "pi-0001"

[broker]
port = 1883

[inference]
source = "replay"
replay_file = "/var/lib/edgefleet/replay.npz"

[telemetry]
interval_s = 10.0
"""


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_config_loads_every_field_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))

    assert config.device_id == "pi-0001"
    assert config.state_dir == Path("/srv/edgefleet")
    broker = config.broker
    assert (broker.host, broker.port, broker.keepalive_s, broker.topic_root) == (
        "mqtt.example.internal", 8883, 15, "acme/edgefleet")
    assert (broker.ca_file, broker.cert_file, broker.key_file) == (
        Path("/etc/edgefleet/tls/ca.pem"), Path("/etc/edgefleet/tls/device.pem"),
        Path("/etc/edgefleet/tls/device.key"))
    assert (broker.username, broker.password) == ("pi-0001", "secret")
    assert (broker.reconnect_min_s, broker.reconnect_max_s) == (1.0, 60.0)
    assert config.trust.keys_dir == Path("/etc/edgefleet/keys.d")
    inference = config.inference
    assert inference.source is InputSource.DIRECTORY
    assert (inference.directory, inference.replay_file) == (Path("/srv/inbox"), None)
    assert (inference.batch_size, inference.pace_s, inference.threads) == (4, 0.01, 2)
    telemetry = config.telemetry
    assert (telemetry.interval_s, telemetry.heartbeat_interval_s, telemetry.max_inflight) == (
        5.0, 20.0, 50)
    assert (telemetry.outbox_max_rows, telemetry.outbox_max_bytes,
            telemetry.outbox_max_age_s) == (500, 1048576, 3600.0)
    install = config.install
    assert (install.chunk_window, install.chunk_timeout_s, install.download_timeout_s,
            install.smoke_samples, install.smoke_max_latency_ms, install.watch_max_error_rate,
            install.watch_max_latency_factor) == (4, 2.5, 120.0, 16, 40.0, 0.05, 2.0)
    assert (config.hardware.root, config.hardware.profile) == (Path("/tmp/fakeroot"), "rpi4-cpu")
    assert config.topics.root == "acme/edgefleet"


def test_a_minimal_config_takes_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))

    defaults = AgentConfig(device_id="pi-0001")
    assert config.state_dir == defaults.state_dir == Path("/var/lib/edgefleet")
    assert config.broker == defaults.broker
    assert config.install == defaults.install
    assert config.inference.replay_file == Path("/var/lib/edgefleet/replay.npz")


def _with(line: str, section: str | None = None) -> str:
    """MINIMAL with `line` added at the top level or at the start of `section`."""
    if section is None:
        return line + "\n" + MINIMAL
    header = f"[{section}]\n"
    if header in MINIMAL:
        return MINIMAL.replace(header, header + line + "\n", 1)
    return MINIMAL + "\n" + header + line + "\n"


BROKEN = [
    pytest.param(MINIMAL.replace('device_id = "pi-0001"', ""), "device_id", "required",
                 id="missing-device-id"),
    pytest.param(MINIMAL.replace('"pi-0001"', '"site/pi-0001"'), "device_id",
                 "got 'site/pi-0001'", id="device-id-with-slash"),
    pytest.param(MINIMAL.replace('"pi-0001"', "1"), "device_id", "Expected `str`",
                 id="device-id-not-a-string"),
    pytest.param(MINIMAL.replace("port = 1883", 'port = "1883"'), "broker.port",
                 "Expected `int`, got `str`", id="port-as-string"),
    pytest.param(MINIMAL.replace("port = 1883", "port = 70000"), "broker.port",
                 "not a TCP port", id="port-too-high"),
    pytest.param(MINIMAL.replace("port = 1883", "port = 0"), "broker.port", "not a TCP port",
                 id="port-zero"),
    pytest.param(_with('hots = "mqtt.local"', "broker"), "broker.hots", "unknown field",
                 id="typo-in-a-section"),
    pytest.param(_with('devce_name = "x"'), "devce_name", "unknown field", id="typo-top-level"),
    pytest.param(_with("intervall_s = 5.0", "telemetry"), "telemetry.intervall_s",
                 "unknown field", id="typo-in-telemetry"),
    pytest.param(_with("broker = 5").replace("[broker]\nport = 1883\n", ""), "broker",
                 "Expected `object`", id="section-as-a-value"),
    pytest.param(_with('cert_file = "/etc/device.pem"', "broker"), "broker.cert_file",
                 "go together", id="cert-without-key"),
    pytest.param(_with('key_file = "/etc/device.key"', "broker"), "broker.cert_file",
                 "go together", id="key-without-cert"),
    pytest.param(_with('topic_root = "a/+/b"', "broker"), "broker.topic_root", "topic root",
                 id="wildcard-in-topic-root"),
    pytest.param(MINIMAL.replace('replay_file = "/var/lib/edgefleet/replay.npz"', ""),
                 "inference.replay_file", "required when source", id="replay-without-file"),
    pytest.param(MINIMAL.replace('source = "replay"', 'source = "directory"'),
                 "inference.directory", "required when source", id="directory-without-path"),
    pytest.param(MINIMAL.replace('source = "replay"', 'source = "camera"'), "inference.source",
                 "Invalid enum value", id="unknown-source"),
    pytest.param(MINIMAL.replace('"/var/lib/edgefleet/replay.npz"', "5"),
                 "inference.replay_file", "expected a path", id="path-as-a-number"),
    pytest.param(_with("state_dir = 1979-05-27"), "state_dir", "expected a path",
                 id="path-as-a-toml-date"),
    pytest.param(MINIMAL.replace("interval_s = 10.0", "interval_s = 0"),
                 "telemetry.interval_s", "positive", id="zero-interval"),
    pytest.param(MINIMAL.replace("interval_s = 10.0", "interval_s = -1.0"),
                 "telemetry.interval_s", "positive", id="negative-interval"),
    pytest.param(MINIMAL.replace("interval_s = 10.0", "interval_s = nan"),
                 "telemetry.interval_s", "positive", id="nan-interval"),
    pytest.param(MINIMAL.replace("interval_s = 10.0", "interval_s = inf"),
                 "telemetry.interval_s", "finite", id="infinite-interval"),
    pytest.param(_with("heartbeat_interval_s = 0.0", "telemetry"),
                 "telemetry.heartbeat_interval_s", "positive", id="zero-heartbeat-interval"),
    pytest.param(_with("max_inflight = 0", "telemetry"), "telemetry.max_inflight", "positive",
                 id="no-inflight-window"),
    pytest.param(_with("outbox_max_rows = 0", "telemetry"), "telemetry.outbox_max_rows",
                 "positive", id="empty-outbox"),
    pytest.param(_with("batch_size = 0", "inference"), "inference.batch_size", "positive",
                 id="zero-batch"),
    pytest.param(_with("smoke_samples = 0", "install"), "install.smoke_samples", "positive",
                 id="no-smoke-samples"),
    pytest.param(_with("download_timeout_s = -5.0", "install"), "install.download_timeout_s",
                 "positive", id="negative-download-timeout"),
]


@pytest.mark.parametrize(("text", "field", "problem"), BROKEN)
def test_a_broken_config_is_refused_naming_the_file_and_the_field(
        tmp_path: Path, text: str, field: str, problem: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert (caught.value.path, caught.value.field) == (path, field)
    message = str(caught.value)
    assert message.startswith(f"{path}: field '{field}': "), message
    assert problem in message


def test_a_file_that_is_not_toml_is_refused_naming_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'device_id = "pi-0001"\n[broker\nport = 1883\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value).startswith(f"{path}: invalid TOML: ")
    assert "line 2" in str(caught.value)


def test_a_missing_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"

    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(path)

    assert str(caught.value).startswith(f"{path}: ")


def test_agent_run_with_a_broken_config_exits_2_naming_the_field_before_connecting(
        tmp_path: Path) -> None:
    # A listening socket the broker setting points at: the agent must not even try it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        state = tmp_path / "state"
        config = write(tmp_path, f"""
device_id = "pi-0001"
state_dir = "{state}"

[broker]
host = "127.0.0.1"
port = {port}

[inference]
replay_file = "{ROOT / 'artifacts/digits/digits.data.npz'}"

[telemetry]
intervall_s = 5.0
""")
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started

        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()

    assert result.returncode == 2, result.stderr
    assert f"{config}: field 'telemetry.intervall_s': unknown field" in result.stderr
    assert "Traceback" not in result.stderr
    assert not state.exists()          # nothing was created either
    assert elapsed < 30


# --- paths relative to the config file, trust and the deploy queue -------------------------------

BUNDLE = """
device_id = "pi-0001"
state_dir = "state"

[broker]
port = 8883
ca_file = "ca.crt"
cert_file = "tls/device.crt"
key_file = "./tls/device.key"

[trust]
keys_dir = "../keys"
root_file = "key-chain.json"

[inference]
source = "replay"
replay_file = "data/replay.npz"

[hardware]
root = "fakeroot"
"""


def test_relative_paths_are_relative_to_the_config_files_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "etc" / "edgefleet"
    bundle.mkdir(parents=True)
    write(bundle, BUNDLE)
    monkeypatch.chdir(tmp_path)                          # not where the bundle is

    config = load_config(Path("etc/edgefleet/agent.toml"))

    base = bundle.resolve()
    assert config.state_dir == base / "state"
    assert (config.broker.ca_file, config.broker.cert_file, config.broker.key_file) == (
        base / "ca.crt", base / "tls/device.crt", base / "tls/device.key")
    assert config.trust.keys_dir == base / "../keys"
    assert config.trust.root_file == base / "key-chain.json"
    assert config.inference.replay_file == base / "data/replay.npz"
    assert config.hardware.root == base / "fakeroot"
    assert all(p is not None and p.is_absolute() for p in (
        config.state_dir, config.broker.ca_file, config.trust.root_file, config.hardware.root))


def test_a_bundle_works_wherever_it_is_copied(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b" / "c"
    for folder in (first, second):
        folder.mkdir(parents=True)
        write(folder, BUNDLE)

    one, other = load_config(first / "agent.toml"), load_config(second / "agent.toml")

    assert one.broker.ca_file == first.resolve() / "ca.crt"
    assert other.broker.ca_file == second.resolve() / "ca.crt"


def test_absolute_paths_stay_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))

    assert config.state_dir == Path("/srv/edgefleet")
    assert config.broker.ca_file == Path("/etc/edgefleet/tls/ca.pem")
    assert config.trust.keys_dir == Path("/etc/edgefleet/keys.d")
    assert config.inference.directory == Path("/srv/inbox")
    assert config.hardware.root == Path("/tmp/fakeroot")


def test_unset_paths_stay_unset(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))

    assert config.trust.root_file is None
    assert (config.broker.ca_file, config.broker.cert_file, config.broker.key_file) == (
        None, None, None)
    assert config.inference.directory is None


def test_trust_root_file_is_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, _with(
        'root_file = "/etc/edgefleet/key-chain.json"', "trust")))

    assert config.trust.root_file == Path("/etc/edgefleet/key-chain.json")
    assert config.trust.keys_dir == AgentConfig(device_id="x").trust.keys_dir


def test_max_queued_deploys_defaults_and_can_be_set(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).install.max_queued_deploys == 8

    config = load_config(write(tmp_path, _with("max_queued_deploys = 2", "install"),
                               name="two.toml"))

    assert config.install.max_queued_deploys == 2


@pytest.mark.parametrize(("line", "problem"), [
    ("max_queued_deploys = 0", "positive"),
    ("max_queued_deploys = -3", "positive"),
    ('max_queued_deploys = "8"', "Expected `int`"),
    ("max_queued_deploys = 2.5", "Expected `int`"),
], ids=["zero", "negative", "string", "float"])
def test_max_queued_deploys_must_be_a_positive_integer(tmp_path: Path, line: str,
                                                       problem: str) -> None:
    path = write(tmp_path, _with(line, "install"))

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.field == "install.max_queued_deploys"
    assert problem in str(caught.value)


def test_a_path_in_trust_must_be_a_string(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, _with("root_file = 5", "trust")))

    assert caught.value.field == "trust.root_file"
