"""A real Mosquitto for tests, and the paho plumbing that talks to it.

Each `MosquittoBroker` owns a directory with its own mosquitto.conf, log and persistence data,
and listens on 127.0.0.1 on a port of its own, so tests never share a broker or touch a system
one. There is no mock broker: what passes here passed against Mosquitto itself.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

HOST = "127.0.0.1"
MOSQUITTO_FALLBACKS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The test broker did not start or stop as asked; the message carries its log."""


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, else where Debian puts it (/usr/sbin is often off PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_FALLBACKS:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_ports(n: int) -> list[int]:
    """`n` distinct ports the kernel just had free on 127.0.0.1 (bind to 0, read, let go)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((HOST, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


@dataclass(frozen=True)
class Listener:
    """An extra listener: its own port (0 picks a free one) and lines that apply to it.

    With ``per_listener_settings true`` the lines (``allow_anonymous``, ``acl_file``,
    ``password_file``) are that listener's own; TLS lines (``cafile``, ``certfile``, ``keyfile``,
    ``require_certificate``, ``use_identity_as_username``) are always per listener.
    """

    lines: Sequence[str] = ()
    port: int = 0
    host: str = HOST


class MosquittoBroker:
    """One Mosquitto process with its config, log and persistence under `directory`.

    The config is written once, when the broker is made, so `restart()` comes back on the same
    port with the same config and the same persistence directory. `port` is the plain default
    listener; `listener_ports` lists the extra listeners' ports in the order given.
    """

    def __init__(
        self,
        directory: Path,
        *,
        allow_anonymous: bool = True,
        persistence: bool = False,
        autosave_interval: int | None = None,
        per_listener_settings: bool = False,
        extra_config: Iterable[str] = (),
        listeners: Iterable[Listener] = (),
        binary: str | None = None,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise BrokerError("mosquitto not found on PATH nor in /usr/sbin; run .ci/run, "
                              "which installs it")
        self.binary = found
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        listeners = list(listeners)
        self.port, *spare = free_ports(1 + sum(1 for lst in listeners if not lst.port))
        self.persistence_dir = self.directory / "data"
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

        extra = [(lst, lst.port or spare.pop()) for lst in listeners]
        self.listener_ports = [port for _, port in extra]
        self.config_text = self._config(
            allow_anonymous=allow_anonymous, persistence=persistence,
            autosave_interval=autosave_interval, per_listener_settings=per_listener_settings,
            extra_config=list(extra_config), listeners=extra)
        self.config_path.write_text(self.config_text)

    def _config(self, *, allow_anonymous: bool, persistence: bool,
                autosave_interval: int | None, per_listener_settings: bool,
                extra_config: list[str], listeners: list[tuple[Listener, int]]) -> str:
        lines = ["# Written by tests/broker.py for one test; see MosquittoBroker."]
        if per_listener_settings:
            lines.append("per_listener_settings true")
        if os.geteuid() == 0:
            # As root, Mosquitto 2 drops to the 'mosquitto' user, which cannot write to a
            # pytest tmp_path (mode 0700); "root" tells it to keep running as we are.
            lines.append("user root")
        lines += ["log_dest stderr", "log_type all", "connection_messages true"]
        if persistence:
            self.persistence_dir.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/"]
            if autosave_interval is not None:
                lines.append(f"autosave_interval {autosave_interval}")
        else:
            lines.append("persistence false")
        lines += extra_config
        lines += [f"listener {self.port} {self.host}",
                  f"allow_anonymous {'true' if allow_anonymous else 'false'}"]
        for listener, port in listeners:
            lines.append(f"listener {port} {listener.host}")
            lines += listener.lines
        return "\n".join(lines) + "\n"

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Launches Mosquitto and returns once it answers a CONNECT with a CONNACK.

        A free port found by `free_ports` can be taken by another process before Mosquitto
        binds it; on a first start that is retried on new ports (a restart keeps its port)."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except BrokerError:
                if self._started or attempt == 2 or "Address already in use" not in (
                        self.log_text().rsplit("--- tests/broker.py: starting", 1)[-1]):
                    raise
                self._move_ports()
        raise AssertionError("unreachable")

    def _move_ports(self) -> None:
        old = [self.port, *self.listener_ports]
        new = free_ports(len(old))
        for before, after in zip(old, new, strict=True):
            self.config_text = self.config_text.replace(f"listener {before} ",
                                                        f"listener {after} ")
        self.port, *self.listener_ports = new
        self.config_path.write_text(self.config_text)

    def _start(self, timeout: float) -> MosquittoBroker:
        if self.running:
            raise BrokerError(f"broker on port {self.port} is already running")
        with self.log_path.open("ab") as log:
            # Appended, not truncated: after restart() the log still tells the whole story.
            log.write(f"--- tests/broker.py: starting {self.binary} -c {self.config_path}\n"
                      .encode())
            log.flush()
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)], cwd=self.directory,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise BrokerError(f"mosquitto exited with status {code} before accepting "
                                  f"connections\n{self._log_excerpt()}")
            if self._answers(timeout=0.5):
                self._started = True
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"mosquitto did not accept an MQTT connection on "
                                  f"{self.host}:{self.port} within {timeout:.0f}s\n"
                                  f"{self._log_excerpt()}")
            time.sleep(0.02)

    def _answers(self, timeout: float) -> bool:
        return _answers_connect(self.host, self.port, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM and wait: a clean shutdown, which also saves persistence."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash. Nothing is saved that the last autosave did not already save."""
        self._end(signal.SIGKILL, 5.0)

    def restart(self, timeout: float = 10.0) -> MosquittoBroker:
        """Clean stop, then start on the same port with the same config and data."""
        self.stop()
        return self.start(timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)
            raise BrokerError(f"mosquitto ignored {sig.name} for {timeout:.0f}s and was killed"
                              f"\n{self._log_excerpt()}") from None

    def __enter__(self) -> MosquittoBroker:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what it said ---------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_excerpt(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return (f"--- {self.log_path} (last {len(tail)} lines) ---\n" + "\n".join(tail)
                + f"\n--- {self.config_path} ---\n{self.config_text}")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MosquittoBroker({self.host}:{self.port}, {state}, {self.directory})"


def _answers_connect(host: str, port: int, timeout: float) -> bool:
    """Whether a broker answers a real CONNECT. Any CONNACK counts, even 'not authorised'."""
    probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
                        protocol=MQTTProtocolVersion.MQTTv311)
    answered = threading.Event()
    probe.on_connect = lambda *_: answered.set()
    try:
        probe.connect(host, port, keepalive=5)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + timeout
        while not answered.is_set() and time.monotonic() < deadline:
            if probe.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                return False
        return answered.is_set()
    finally:
        probe.disconnect()


# --- paho clients for tests --------------------------------------------------------------------

@dataclass(frozen=True)
class Connack:
    reason: ReasonCode
    session_present: bool


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class LoopbackClient(mqtt.Client):
    """A paho v2 client with its network loop running and calls that wait for the broker."""

    connack: Connack

    def subscribe_and_wait(self, topic_filter: str, qos: int = 1,
                           timeout: float = 5.0) -> list[ReasonCode]:
        """Subscribes and returns the SUBACK's reason codes; a refused filter raises."""
        acked: dict[int, list[ReasonCode]] = {}
        done = threading.Condition()

        def on_subscribe(client: mqtt.Client, userdata: Any, mid: int,
                         reason_codes: list[ReasonCode], properties: Properties | None) -> None:
            with done:
                acked[mid] = reason_codes
                done.notify_all()

        # Installed before SUBSCRIBE goes out, so a SUBACK that beats our return is not lost.
        self.on_subscribe = on_subscribe
        rc, mid = self.subscribe(topic_filter, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"SUBSCRIBE {topic_filter!r} not sent: {mqtt.error_string(rc)}")
        with done:
            if not done.wait_for(lambda: mid in acked, timeout):
                raise BrokerError(f"no SUBACK for {topic_filter!r} within {timeout}s")
        codes = acked[mid]
        if any(code.is_failure for code in codes):
            raise BrokerError(f"SUBSCRIBE {topic_filter!r} refused: {codes}")
        return codes

    def publish_and_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                         timeout: float = 5.0) -> None:
        """Publishes and waits until sent (QoS 0) or acknowledged (QoS 1 and 2)."""
        info = self.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"PUBLISH {topic!r} not sent: {mqtt.error_string(info.rc)}")
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise BrokerError(f"PUBLISH {topic!r} (QoS {qos}) not acknowledged in {timeout}s")

    def close(self) -> None:
        """Clean DISCONNECT (no last will) and stop the loop thread."""
        if self.is_connected():
            self.disconnect()
        self.loop_stop()


def connect_client(
    port: int,
    *,
    host: str = HOST,
    client_id: str | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    clean_start: bool = True,
    session_expiry: int | None = None,
    will: Will | None = None,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 10,
    on_message: mqtt.CallbackOnMessage | None = None,
    before_connect: Callable[[LoopbackClient], object] | None = None,
    timeout: float = 5.0,
) -> LoopbackClient:
    """A connected `LoopbackClient` with `loop_start()` done; raises if the CONNACK refuses.

    `clean_start` False keeps the session: MQTT 5 sends Clean Start 0 with `session_expiry`
    (seconds; default 300 then), MQTT 3.1.1 sends Clean Session 0. Pass `on_message` here, not
    afterwards, when a resumed session may deliver queued messages right after the CONNACK.
    `before_connect` gets the client first, for what paho wants set before CONNECT, e.g.
    ``before_connect=lambda c: c.tls_set(ca_certs=..., certfile=..., keyfile=...)``.
    """
    client_id = client_id or f"test-{uuid.uuid4().hex[:12]}"
    v5 = protocol is MQTTProtocolVersion.MQTTv5
    client = LoopbackClient(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                            clean_session=None if v5 else clean_start)
    if username is not None:
        client.username_pw_set(username, password)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    connected = threading.Event()
    connacks: list[Connack] = []

    def on_connect(client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                   reason: ReasonCode, properties: Properties | None) -> None:
        connacks.append(Connack(reason, flags.session_present))
        connected.set()

    client.on_connect = on_connect
    client.on_message = on_message
    if before_connect is not None:
        before_connect(client)
    properties: Properties | None = None
    if v5:
        expiry = session_expiry if session_expiry is not None else (0 if clean_start else 300)
        if expiry:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = expiry
        client.connect(host, port, keepalive=keepalive, clean_start=clean_start,
                       properties=properties)
    else:
        client.connect(host, port, keepalive=keepalive)
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise BrokerError(f"no CONNACK from {host}:{port} for {client_id} within {timeout}s")
    client.connack = connacks[-1]
    if client.connack.reason.is_failure:
        client.loop_stop()
        raise BrokerError(f"CONNECT refused for {client_id}: {client.connack.reason}")
    return client


# --- what a subscriber received ----------------------------------------------------------------

@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MessageCollector:
    """Records messages from paho's loop thread; tests wait on it from their own thread.

    Use it as the client's ``on_message``: ``client.on_message = collector``.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Received] = queue.Queue()
        self._taken: list[Received] = []

    def __call__(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._queue.put(Received(message.topic, bytes(message.payload), message.qos,
                                 bool(message.retain)))

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:
        """The first `n` messages received, waiting up to `timeout` seconds in all for them."""
        deadline = time.monotonic() + timeout
        while len(self._taken) < n:
            remaining = deadline - time.monotonic()
            try:
                self._taken.append(self._queue.get(timeout=max(remaining, 0.0)))
            except queue.Empty:
                raise AssertionError(
                    f"expected {n} message(s) within {timeout}s, got {len(self._taken)}: "
                    f"{[m.topic for m in self._taken]}") from None
        return self._taken[:n]

    def so_far(self) -> list[Received]:
        """Every message received until now, without waiting."""
        while True:
            try:
                self._taken.append(self._queue.get_nowait())
            except queue.Empty:
                return list(self._taken)

    def expect_none(self, within: float = 0.3) -> None:
        """Asserts no message beyond those already taken arrives within `within` seconds."""
        try:
            extra = self._queue.get(timeout=within)
        except queue.Empty:
            return
        self._taken.append(extra)
        raise AssertionError(f"expected no more messages, got one on {extra.topic!r}")
