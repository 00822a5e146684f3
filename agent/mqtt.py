"""The agent's one paho-mqtt adapter: paho callbacks in, contract types out.

A persistent session (fixed client id, clean start off, a long session expiry) so commands sent
while the device is offline wait for it in the broker; a retained presence message with a last
will so the fleet sees a dead connection; reconnects with exponential backoff and jitter. Inbound
payloads are parsed and decoded here, on paho's thread, and handed over as `Inbound` values; a
payload that does not decode becomes a `Malformed` value with the reason, never an exception.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import BrokerConfig
from edgefleet.contract import (
    ContractError,
    Topic,
    TopicSchema,
    WireMessage,
    decode_topic,
)

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 86_400   # commands wait a week for an offline device


@dataclass(frozen=True)
class Inbound:
    topic: Topic
    message: WireMessage


@dataclass(frozen=True)
class Malformed:
    topic: str
    reason: str
    command_id: str | None      # known when the payload was JSON with a command_id


@dataclass(frozen=True)
class KeyChainUpdate:
    """The fleet's key chain as published; verified by agent.trust, not here."""

    payload: bytes


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class AgentLink:
    """One MQTT connection for one device."""

    def __init__(self, device_id: str, broker: BrokerConfig, *,
                 on_inbound: Callable[[Inbound | Malformed | KeyChainUpdate], None],
                 on_connection: Callable[[bool], None],
                 on_published: Callable[[int], None],
                 will: Outgoing, birth: Callable[[], list[Outgoing]],
                 protocol: paho.MQTTProtocolVersion = paho.MQTTv5) -> None:
        self.device_id = device_id
        self.schema = TopicSchema(broker.topic_root)
        self._broker = broker
        self._on_inbound = on_inbound
        self._on_connection = on_connection
        self._on_published = on_published
        self._birth = birth
        self._connected = threading.Event()
        self._protocol = protocol
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                             protocol=protocol,
                             clean_session=None if protocol == paho.MQTTv5 else False)
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if broker.username:
            client.username_pw_set(broker.username, broker.password)
        if broker.ca_file or broker.cert_file:
            client.tls_set(ca_certs=str(broker.ca_file) if broker.ca_file else None,
                           certfile=str(broker.cert_file) if broker.cert_file else None,
                           keyfile=str(broker.key_file) if broker.key_file else None,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.max_queued_messages_set(0)
        client.on_connect = self._handle_connect
        client.on_subscribe = self._handle_subscribe
        self._subscribe_mid: int | None = None
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        self._client = client
        self._jitter()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Connects in the background; paho's loop reconnects with our backoff from then on."""
        properties = None
        if self._protocol == paho.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(self._broker.host, self._broker.port,
                                   keepalive=self._broker.keepalive_s,
                                   clean_start=False if self._protocol == paho.MQTTv5
                                   else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                   properties=properties)
        self._client.loop_start()

    def stop(self, farewell: Outgoing | None = None) -> None:
        """Disconnects cleanly (after `farewell`, e.g. an offline presence) and stops the loop."""
        if farewell is not None and self.connected:
            info = self._client.publish(farewell.topic, farewell.payload, farewell.qos,
                                        farewell.retain)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, message: Outgoing) -> int | None:
        """Publishes now; returns paho's message id, or None when not connected."""
        if not self.connected:
            return None
        info = self._client.publish(message.topic, message.payload, qos=message.qos,
                                    retain=message.retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    # --- paho callbacks (paho's network thread) ---------------------------------------------

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                        properties: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        # "Connected" means subscribed: presence goes out, and callers proceed, only once the
        # broker has acknowledged the subscriptions (SUBACK), so nothing sent to the device in
        # between can miss it.
        _, self._subscribe_mid = client.subscribe(
            self.schema.agent_subscriptions(self.device_id))

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                          properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        for message in self._birth():
            client.publish(message.topic, message.payload, qos=message.qos,
                           retain=message.retain)
        self._connected.set()
        self._on_connection(True)

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                           properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._jitter()
        if was_connected:
            log.info("disconnected from the broker: %s", reason)
            self._on_connection(False)

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                        properties: Any) -> None:
        self._on_published(mid)

    def _handle_message(self, client: paho.Client, userdata: Any,
                        message: paho.MQTTMessage) -> None:
        # An exception escaping here would end paho's network thread: the agent would live on
        # without a connection. Whatever one message does, the next one is still read.
        try:
            self._route(message)
        except Exception:
            log.exception("dropped a message on %s that could not be handled", message.topic)

    def _route(self, message: paho.MQTTMessage) -> None:
        if message.topic == self.schema.key_chain:
            if message.payload:          # an empty retained payload only clears the topic
                self._on_inbound(KeyChainUpdate(bytes(message.payload)))
            return
        try:
            topic = self.schema.parse(message.topic)
            if topic.device_id != self.device_id:
                raise ContractError("topic", "device_id", self.device_id, topic.device_id)
            inbound: Inbound | Malformed = Inbound(topic, decode_topic(topic,
                                                                       bytes(message.payload)))
        except ContractError as exc:
            inbound = Malformed(message.topic, str(exc), _command_id(bytes(message.payload)))
        self._on_inbound(inbound)

    def _jitter(self) -> None:
        # Full jitter on the first delay spreads a fleet that lost its broker at the same moment.
        low = self._broker.reconnect_min_s
        self._client.reconnect_delay_set(
            min_delay=max(1, round(random.uniform(low, 2 * low + 1))),
            max_delay=max(1, round(self._broker.reconnect_max_s)))


def _command_id(payload: bytes) -> str | None:
    try:
        value = msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    command_id = value.get("command_id") if isinstance(value, dict) else None
    return command_id if isinstance(command_id, str) and len(command_id) <= 128 else None

