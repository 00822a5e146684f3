"""The MQTT topic tree: one schema object that both builds and parses every topic.

Every device-scoped topic has the device id right after ``{root}/dev/`` so that one broker ACL
pattern (``{root}/dev/%u/...``) confines a device to its own subtree. QoS, retain and payload
encoding per channel live in `CHANNELS`; docs/decisions/0001-mqtt-topic-tree.md says why.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from edgefleet.contract.errors import DecodeError, EncodeError

# Letters, digits, '.', '_' and '-': no MQTT wildcard, no level separator, no leading '$'.
# The same id is the client certificate's common name and the broker username (issue 8).
# \Z, not $: "$" also matches before a trailing newline, and "pi-1\n" is no device id.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_ROOT_LEVEL = re.compile(r"^[A-Za-z0-9._-]+\Z")


class Channel(enum.Enum):
    PRESENCE = "presence"
    FACTS = "facts"
    HEARTBEAT = "heartbeat"
    TELEMETRY = "telemetry"
    COMMAND = "cmd"
    STATUS = "status"
    CHUNK_REQUEST = "artifact/request"
    CHUNK = "artifact/chunk"


class CommandKind(enum.Enum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    SHADOW = "shadow"
    CONFIG = "config"


class Direction(enum.Enum):
    FROM_DEVICE = "device->controller"
    TO_DEVICE = "controller->device"


class Encoding(enum.Enum):
    JSON = "json"
    MSGPACK = "msgpack"


@dataclass(frozen=True)
class ChannelSpec:
    qos: int
    retain: bool
    direction: Direction
    encoding: Encoding
    why: str


CHANNELS: Mapping[Channel, ChannelSpec] = {
    Channel.PRESENCE: ChannelSpec(
        1, True, Direction.FROM_DEVICE, Encoding.JSON,
        "Retained so a controller that starts later sees who is online; also the last will, "
        "so the broker marks a device offline when its connection dies."),
    Channel.FACTS: ChannelSpec(
        1, True, Direction.FROM_DEVICE, Encoding.JSON,
        "Retained: hardware and runtimes change rarely and a new controller needs them at once."),
    Channel.HEARTBEAT: ChannelSpec(
        0, False, Direction.FROM_DEVICE, Encoding.JSON,
        "Only the newest one matters; a lost heartbeat is replaced by the next one."),
    Channel.TELEMETRY: ChannelSpec(
        1, False, Direction.FROM_DEVICE, Encoding.JSON,
        "Every window counts for rollout gates; the agent's outbox replays until PUBACK and the "
        "controller deduplicates on (device, seq), so at-least-once is enough."),
    Channel.COMMAND: ChannelSpec(
        1, False, Direction.TO_DEVICE, Encoding.JSON,
        "Queued in the device's persistent session while it is offline. Never retained: a "
        "retained deploy would be replayed to the device on every reconnect."),
    Channel.STATUS: ChannelSpec(
        1, False, Direction.FROM_DEVICE, Encoding.JSON,
        "Each install step drives the rollout state; statuses are idempotent per command id."),
    Channel.CHUNK_REQUEST: ChannelSpec(
        1, False, Direction.FROM_DEVICE, Encoding.JSON,
        "The device pulls its artifact in windows it asks for, which is the flow control."),
    Channel.CHUNK: ChannelSpec(
        1, False, Direction.TO_DEVICE, Encoding.MSGPACK,
        "Binary payloads travel as MessagePack bytes (JSON would base64 them, +33%); the "
        "device re-requests what it misses, and verifies the sha256 of the whole file."),
}


@dataclass(frozen=True)
class Topic:
    """A parsed topic: which channel, which device, and for commands which kind."""

    channel: Channel
    device_id: str
    command: CommandKind | None = None


def validate_device_id(device_id: str) -> str:
    if not DEVICE_ID_PATTERN.match(device_id):
        raise EncodeError(
            "device id", "$", "letters, digits, '.', '_' or '-' (1-64, not starting with "
            "'.', '_' or '-')", repr(device_id))
    return device_id


@dataclass(frozen=True)
class TopicSchema:
    """Builds and parses ``{root}/dev/{device_id}/{channel}[/{command}]``.

    >>> s = TopicSchema("acme/edgefleet")
    >>> s.build(Channel.TELEMETRY, "pi-0001")
    'acme/edgefleet/dev/pi-0001/telemetry'
    >>> s.command("pi-0001", CommandKind.DEPLOY)
    'acme/edgefleet/dev/pi-0001/cmd/deploy'
    >>> t = s.parse("acme/edgefleet/dev/pi-0001/cmd/deploy")
    >>> t.channel.name, t.device_id, t.command.name if t.command else None
    ('COMMAND', 'pi-0001', 'DEPLOY')
    >>> s.filter(Channel.TELEMETRY)
    'acme/edgefleet/dev/+/telemetry'
    """

    root: str = "edgefleet"

    def __post_init__(self) -> None:
        levels = self.root.split("/")
        if not all(_ROOT_LEVEL.match(level) for level in levels) or self.root.startswith("$"):
            raise EncodeError(
                "topic root", "$", "levels of letters, digits, '.', '_' or '-' joined by '/'",
                repr(self.root))

    @property
    def devices_prefix(self) -> str:
        return f"{self.root}/dev/"

    def build(self, channel: Channel, device_id: str, command: CommandKind | None = None) -> str:
        validate_device_id(device_id)
        if (channel is Channel.COMMAND) != (command is not None):
            raise EncodeError("topic", "command", "a command kind exactly for Channel.COMMAND",
                              f"{channel.name} with {command}")
        base = f"{self.root}/dev/{device_id}/{channel.value}"
        return f"{base}/{command.value}" if command is not None else base

    def command(self, device_id: str, kind: CommandKind) -> str:
        return self.build(Channel.COMMAND, device_id, kind)

    def parse(self, topic: str) -> Topic:
        if not topic.startswith(self.devices_prefix):
            raise DecodeError("topic", "$", f"a topic under '{self.devices_prefix}'", repr(topic))
        device_id, _, rest = topic[len(self.devices_prefix):].partition("/")
        if not DEVICE_ID_PATTERN.match(device_id):
            raise DecodeError("topic", "device_id", "a valid device id", repr(device_id))
        if rest.startswith("cmd/"):
            kind = rest[len("cmd/"):]
            try:
                return Topic(Channel.COMMAND, device_id, CommandKind(kind))
            except ValueError:
                raise DecodeError("topic", "command", "one of "
                                  + ", ".join(k.value for k in CommandKind), repr(kind)) from None
        try:
            channel = Channel(rest)
        except ValueError:
            raise DecodeError("topic", "channel", "one of "
                              + ", ".join(c.value for c in Channel), repr(rest)) from None
        if channel is Channel.COMMAND:
            raise DecodeError("topic", "command", "cmd/<kind>", repr(rest))
        return Topic(channel, device_id)

    def filter(self, channel: Channel, device_id: str = "+") -> str:
        """A subscription filter for one channel, all devices by default."""
        if device_id != "+":
            validate_device_id(device_id)
        suffix = "/+" if channel is Channel.COMMAND else ""
        return f"{self.root}/dev/{device_id}/{channel.value}{suffix}"

    @property
    def key_chain(self) -> str:
        """The fleet's signed key lists (contract.keylist), retained, written by controllers."""
        return f"{self.root}/fleet/keys"

    def agent_subscriptions(self, device_id: str) -> list[tuple[str, int]]:
        """What an agent subscribes to: its commands, its artifact chunks, the key chain."""
        return [*((self.filter(c, device_id), CHANNELS[c].qos)
                  for c in (Channel.COMMAND, Channel.CHUNK)), (self.key_chain, 1)]

    def controller_subscriptions(self, share_group: str | None = None) -> list[tuple[str, int]]:
        """What a controller subscribes to: every channel that flows from devices.

        With `share_group`, MQTT v5 shared subscriptions (``$share/{group}/...``) spread the
        streams over several controller processes. Retained channels stay plain: the spec says
        a shared subscription gets no retained messages (brokers differ), and every controller
        needs the full presence and facts picture; their writes are idempotent upserts.
        """
        filters = []
        for channel, spec in CHANNELS.items():
            if spec.direction is not Direction.FROM_DEVICE:
                continue
            topic_filter = self.filter(channel)
            if share_group is not None and not spec.retain:
                topic_filter = f"$share/{share_group}/{topic_filter}"
            filters.append((topic_filter, spec.qos))
        return filters

    def device_acl(self) -> list[tuple[str, str]]:
        """Mosquitto ACL patterns (``%u`` = the device's username) for one device's subtree:
        it writes what flows to controllers and reads what flows to it, nothing else."""
        rules = []
        for channel, spec in CHANNELS.items():
            pattern = f"{self.root}/dev/%u/{channel.value}" + (
                "/+" if channel is Channel.COMMAND else "")
            access = "write" if spec.direction is Direction.FROM_DEVICE else "read"
            rules.append((access, pattern))
        rules.append(("read", self.key_chain))
        return rules

    def controller_acl(self) -> list[tuple[str, str]]:
        """A controller reads every device's outbound channels and writes their inbound ones
        and the key chain; it cannot speak as a device."""
        rules = []
        for channel, spec in CHANNELS.items():
            access = "read" if spec.direction is Direction.FROM_DEVICE else "write"
            rules.append((access, self.filter(channel)))
        rules.append(("readwrite", self.key_chain))
        return rules
