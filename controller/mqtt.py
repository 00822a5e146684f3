"""The controller's one paho-mqtt adapter: device traffic in, commands and chunks out.

Inbound messages are handed over as (topic, payload) on a bounded queue; when the queue is full
the paho thread blocks, which stops reading the socket, so the broker buffers for us instead of
this process dropping anything. Decoding happens in the consumers, in batches. Acknowledgement
is manual: a consumer acks a message only once it is stored, so a controller killed with work
in its queue gets that work redelivered (the ingest is idempotent on (device, seq)); the MQTT 5
Receive Maximum we ask for bounds how much may be unacknowledged. Outbound QoS 1
publishes are bounded by a semaphore released on PUBACK, because paho silently loses QoS 1
publishes beyond about 65,000 unacknowledged.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.contract import TopicSchema

log = logging.getLogger(__name__)


RECEIVE_MAXIMUM = 5000


class BrokerUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    topic_root: str = "edgefleet"
    client_id: str = "edgefleet-controller"
    share_group: str | None = None       # MQTT 5 shared subscription for several controllers
    session_expiry_s: int = 3600         # the broker keeps our queue while we restart (alone)
    max_inflight: int = 1000
    inbound_queue: int = 50_000
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 0


class ControllerLink:
    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.schema = TopicSchema(settings.topic_root)
        self.inbound: queue.Queue[Received] = queue.Queue(maxsize=settings.inbound_queue)
        self._inflight = threading.BoundedSemaphore(settings.max_inflight)
        self._pending: set[int] = set()     # mids awaiting PUBACK
        self._early: set[int] = set()       # PUBACKs that arrived before we noted the mid
        self._pending_lock = threading.Lock()
        self._connected = threading.Event()
        self.connections = 0    # CONNACKs so far: lets callers redo what a new session needs
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                             protocol=paho.MQTTv5, manual_ack=True)
        if settings.username:
            client.username_pw_set(settings.username, settings.password)
        if settings.ca_file or settings.cert_file:
            try:
                client.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None,
                               certfile=str(settings.cert_file) if settings.cert_file else None,
                               keyfile=str(settings.key_file) if settings.key_file else None,
                               tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError) as exc:
                raise BrokerUnavailable(f"TLS files for the broker: {exc}") from None
        # Our semaphore is the window. paho's own (when not 0) rescans every unacknowledged
        # message on each PUBACK, which made a wave of chunk publishes quadratic.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.reconnect_delay_set(1, 30)
        self._client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        properties = Properties(PacketTypes.CONNECT)
        # Unacknowledged deliveries the broker allows us: more than an ingest batch, or the
        # stream would stall waiting for acks that come only after the batch commits.
        properties.ReceiveMaximum = RECEIVE_MAXIMUM
        # In a share group a session kept for a dead member still takes its turn: Mosquitto
        # queues that member's share of the streams (statuses, chunk requests) for it instead
        # of handing it to the members still running. So a member's session ends with its
        # connection, and the others take the whole stream at once.
        properties.SessionExpiryInterval = (0 if self.settings.share_group
                                            else self.settings.session_expiry_s)
        try:
            self._client.connect(self.settings.host, self.settings.port, keepalive=30,
                                 clean_start=False, properties=properties)
        except OSError as exc:
            raise BrokerUnavailable(f"cannot reach the MQTT broker at {self.settings.host}:"
                                    f"{self.settings.port}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self._client.loop_stop()
            raise BrokerUnavailable(f"no CONNACK from {self.settings.host}:"
                                    f"{self.settings.port} within {timeout:.0f} s")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                timeout: float = 30.0) -> bool:
        """Publishes, waiting for room in the in-flight window; False if none came in time."""
        if qos == 0:
            return self._client.publish(topic, payload, qos=0, retain=retain).rc == 0
        if not self._inflight.acquire(timeout=timeout):
            log.warning("publish window full for %.0f s; not sent: %s", timeout, topic)
            return False
        # Never hold our lock while calling paho: paho calls _on_publish holding its own lock.
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            self._inflight.release()
            return False
        with self._pending_lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                acked = True
            else:
                self._pending.add(info.mid)
                acked = False
        if acked:
            self._inflight.release()
        return True

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self._pending_lock:
            if mid not in self._pending:
                if len(self._early) > 10_000:  # QoS 0 sends also report here; keep it bounded
                    self._early.clear()
                self._early.add(mid)
                return
            self._pending.discard(mid)
        self._inflight.release()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the controller: %s", reason)
            return
        client.subscribe(self.schema.controller_subscriptions(self.settings.share_group))
        self.connections += 1
        self._connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()
        log.warning("disconnected from the broker: %s", reason)

    def _on_message(self, client: paho.Client, userdata: Any,
                    message: paho.MQTTMessage) -> None:
        self.inbound.put(Received(message.topic, bytes(message.payload), message.mid,
                                  message.qos))

    def ack(self, items: list[Received]) -> None:
        """Acknowledges stored messages (QoS 0 needs none)."""
        for item in items:
            if item.qos:
                self._client.ack(item.mid, item.qos)
