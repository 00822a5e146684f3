"""Store and forward: publishes the outbox in order and deletes a message only on its PUBACK.

At most `max_inflight` messages are unacknowledged at once: paho silently loses QoS 1 publishes
beyond about 65,000 in flight, and a bounded window also bounds the broker's queue for us. On a
reconnect everything still in the outbox is sent again from the oldest; paho may also resend
what it had in flight, so the controller sees some messages twice and de-duplicates them on
(device, sequence): at-least-once, never lost.

Locking: paho calls `on_published` while holding its own message lock, and `publish` takes that
lock, so this class never calls paho while holding its lock, and `on_published` only records
the id; the forwarder's thread deletes acknowledged rows, in batches.
"""

from __future__ import annotations

import logging
import threading

from agent.mqtt import AgentLink, Outgoing
from agent.outbox import Outbox

log = logging.getLogger(__name__)


class Forwarder(threading.Thread):
    def __init__(self, outbox: Outbox, link: AgentLink, *, max_inflight: int = 200) -> None:
        super().__init__(name="forwarder", daemon=True)
        self.outbox = outbox
        self.link = link
        self.max_inflight = max_inflight
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inflight: dict[int, int] = {}       # paho mid -> outbox id, this connection
        self._previous: dict[int, int] = {}       # the same, from the connection before
        self._early: set[int] = set()             # PUBACKs that beat their registration
        self._publishing = False                  # between link.publish and registering it
        self._acked: list[int] = []               # outbox ids to delete
        self._generation = 0                      # bumped on every (re)connect
        self._halt = threading.Event()
        self.published = 0
        self.acked = 0

    # --- called from other threads (never blocking on paho) ----------------------------------

    def wake(self) -> None:
        self._wakeup.set()

    def connection_changed(self, connected: bool) -> None:
        with self._lock:
            # paho may still complete what was in flight (it resends on reconnect), so those
            # stay known for one more connection, without taking room in the window.
            self._previous = self._inflight
            self._inflight = {}
            self._early.clear()
            self._generation += 1
        self._wakeup.set()

    def on_published(self, mid: int) -> None:
        with self._lock:
            message_id = self._inflight.pop(mid, None)
            if message_id is None:
                message_id = self._previous.pop(mid, None)
            if message_id is None:
                # Unknown outside a publish of ours: a PUBACK for the link's own publishes
                # (birth, heartbeat, chunk request). Kept, it would ack the later message that
                # reuses its mid once paho's 16-bit ids wrap, before the broker has it.
                if self._publishing:
                    self._early.add(mid)
            else:
                self._acked.append(message_id)
        self._wakeup.set()

    def stop(self) -> None:
        self._halt.set()
        self._wakeup.set()

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # --- the forwarding thread -------------------------------------------------------------

    def run(self) -> None:
        generation, cursor = -1, 0
        while not self._halt.is_set():
            self._wakeup.clear()
            self._delete_acknowledged()
            with self._lock:
                if generation != self._generation:
                    # A (re)connect: send everything still stored again, oldest first.
                    generation, cursor = self._generation, 0
                room = self.max_inflight - len(self._inflight)
            if not self.link.connected or room <= 0:
                self._wakeup.wait(timeout=0.5)
                continue
            batch = self.outbox.pending(limit=room, after_id=cursor or None)
            if not batch:
                self._wakeup.wait(timeout=0.5)
                continue
            for message in batch:
                with self._lock:
                    self._publishing = True
                mid = self.link.publish(Outgoing(message.topic, message.payload, message.qos,
                                                 message.retain))
                with self._lock:
                    # Only this publish can have been acked early; other mids are not ours.
                    early, self._early, self._publishing = self._early, set(), False
                    if mid is None or generation != self._generation:
                        break                      # disconnected or reconnected meanwhile
                    if mid in early:
                        self._acked.append(message.id)
                    else:
                        self._inflight[mid] = message.id
                cursor = message.id
                self.published += 1
        self._delete_acknowledged()

    def _delete_acknowledged(self) -> None:
        with self._lock:
            acked, self._acked = self._acked, []
        if not acked:
            return
        with self.outbox.transaction():
            for message_id in acked:
                self.outbox.ack(message_id)
        self.acked += len(acked)
