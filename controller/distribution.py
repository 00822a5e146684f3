"""Serves artifact chunks over MQTT to devices that ask for them, with flow control.

Devices pull: each asks for a window of chunks (ChunkRequest), and asks again for what did not
arrive. The server clamps every window (a device cannot make it send a whole artifact at once),
reads chunks from a small cache of artifact files, and publishes through the link, whose
in-flight bound keeps paho under its limit; the per-device window keeps each device's broker
queue far below Mosquitto's max_queued_messages, so a wave of devices downloading at once
slows down instead of losing messages.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgefleet.contract import ArtifactChunk, Channel, ChunkRequest, TopicSchema, encode

log = logging.getLogger(__name__)

MAX_WINDOW = 16


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                timeout: float = 30.0) -> bool: ...


class ArtifactCache:
    """Artifact bytes by id, least recently used evicted beyond `max_bytes`."""

    def __init__(self, locate: Callable[[str], Path | None], max_bytes: int = 256 * 2**20
                 ) -> None:
        self._locate = locate
        self._max_bytes = max_bytes
        self._files: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, artifact_id: str) -> bytes | None:
        with self._lock:
            data = self._files.get(artifact_id)
            if data is not None:
                self._files.move_to_end(artifact_id)
                return data
        path = self._locate(artifact_id)
        if path is None or not path.is_file():
            return None
        data = path.read_bytes()
        with self._lock:
            self._files[artifact_id] = data
            self._size += len(data)
            while self._size > self._max_bytes and len(self._files) > 1:
                _, evicted = self._files.popitem(last=False)
                self._size -= len(evicted)
        return data


class ChunkServer:
    def __init__(self, schema: TopicSchema, link: Publisher, cache: ArtifactCache,
                 chunk_size: Callable[[str], int | None]) -> None:
        self.schema = schema
        self.link = link
        self.cache = cache
        self._chunk_size = chunk_size
        self.served = 0
        self.refused = 0

    def serve(self, request: ChunkRequest) -> int:
        """Publishes the requested window (clamped); returns how many chunks were sent."""
        data = self.cache.get(request.artifact_id)
        size = self._chunk_size(request.artifact_id)
        if data is None or not size:
            self.refused += 1
            log.warning("%s asked for unknown artifact %s", request.device_id,
                        request.artifact_id)
            return 0
        total = max(1, -(-len(data) // size))
        first = max(0, request.first)
        last = min(total, first + max(0, min(request.count, MAX_WINDOW)))
        topic = self.schema.build(Channel.CHUNK, request.device_id)
        sent = 0
        for index in range(first, last):
            chunk = ArtifactChunk(artifact_id=request.artifact_id, index=index, total=total,
                                  data=data[index * size:(index + 1) * size])
            if not self.link.publish(topic, encode(chunk), qos=1):
                break  # the device will ask again for what it misses
            sent += 1
        self.served += sent
        return sent
