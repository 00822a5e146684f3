"""`edgefleet serve`: ingest, artifact distribution and the rollout driver in one process.

Threads: paho's loop (controller.mqtt) fills a bounded queue; the ingest thread drains it in
batches, one transaction per channel per batch, and routes chunk requests to the chunk worker;
the chunk worker publishes artifact windows; the rollout thread ticks every active rollout.
Several processes can run against one PostgreSQL: MQTT 5 shared subscriptions split the
streams, and advisory locks let one process at a time step each rollout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import select

from controller.commands import CommandIssuer
from controller.db.engine import DatabaseUnavailable, make_engine
from controller.db.ingest import (
    FactsWriter,
    HeartbeatWriter,
    PresenceWriter,
    StatusWriter,
    TelemetryWriter,
)
from controller.db.migrate import upgrade
from controller.db.schema import Variant
from controller.distribution import ArtifactCache, ChunkServer
from controller.keys import chain_payload, load_signing_key
from controller.mqtt import BrokerSettings, ControllerLink, Received
from controller.pki import CA_KEY, FleetCA
from controller.rollout.driver import RolloutDriver
from controller.settings import ControllerSettings
from edgefleet.contract import Channel, ChunkRequest, ContractError, decode

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, home: Path, settings: ControllerSettings) -> None:
        self.home = home
        self.settings = settings
        self.db = make_engine(settings.database_url)
        upgrade(self.db)
        self.key = load_signing_key(home / "keys")
        broker = settings.broker
        self.link = ControllerLink(BrokerSettings(
            host=broker.host, port=broker.port, topic_root=broker.topic_root,
            client_id=broker.client_id, share_group=broker.share_group,
            username=broker.username, password=broker.password,
            **{name: home / value for name in ("ca_file", "cert_file", "key_file")
               if (value := getattr(broker, name))}))
        self.schema = self.link.schema
        self.writers: dict[Channel, Any] = {
            Channel.TELEMETRY: TelemetryWriter(self.db), Channel.STATUS: StatusWriter(self.db),
            Channel.PRESENCE: PresenceWriter(self.db), Channel.FACTS: FactsWriter(self.db),
            Channel.HEARTBEAT: HeartbeatWriter(self.db),
        }
        self.chunks = ChunkServer(self.schema, self.link, ArtifactCache(self._artifact_file),
                                  lambda artifact_id: settings.chunk_size)
        self.chunk_requests: queue.Queue[ChunkRequest] = queue.Queue(maxsize=10_000)
        self.issuer = CommandIssuer(self.db, self.key, self.schema,
                                    lambda topic, payload: self.link.publish(topic, payload),
                                    chunk_size=settings.chunk_size,
                                    manifest_ttl_s=settings.manifest_ttl_s)
        self.driver = RolloutDriver(self.db, self.issuer)
        self.malformed = 0
        self._files: dict[str, Path | None] = {}
        self._published_chain: tuple[int, bytes] | None = None
        self._next_crl_check = 0.0

    def run(self, stop: threading.Event) -> int:
        self.link.start()
        threads = [threading.Thread(target=target, args=(stop,), name=name, daemon=True)
                   for name, target in (("ingest", self._ingest), ("chunks", self._serve_chunks),
                                        ("rollouts", self._drive))]
        for thread in threads:
            thread.start()
        log.info("serving: broker %s:%d, database %s", self.settings.broker.host,
                 self.settings.broker.port, self.db.url.render_as_string(hide_password=True))
        stop.wait()
        for thread in threads:
            thread.join(timeout=10)
        self.link.stop()
        return 0

    # --- ingest ----------------------------------------------------------------------------

    def _ingest(self, stop: threading.Event) -> None:
        batch_size, flush_s = self.settings.ingest_batch, self.settings.ingest_flush_s
        while not stop.is_set():
            batch: list[Received] = []
            deadline = time.monotonic() + flush_s
            while len(batch) < batch_size:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(self.link.inbound.get(timeout=timeout))
                except queue.Empty:
                    break
            while batch and not stop.is_set():
                try:
                    self.ingest(batch)
                except DatabaseUnavailable as exc:
                    # Not acknowledged, so nothing is lost: retry the same batch.
                    log.error("database unavailable, retrying the batch: %s", exc)
                    stop.wait(1.0)
                    continue
                except Exception:
                    log.exception("ingest of a batch failed; storing its messages one by one")
                    try:
                        self._ingest_one_by_one(batch)
                    except DatabaseUnavailable as exc:
                        log.error("database unavailable, retrying the batch: %s", exc)
                        stop.wait(1.0)
                        continue
                self.link.ack(batch)
                break

    def _ingest_one_by_one(self, batch: list[Received]) -> None:
        """A message that breaks ingest must not stop it for the whole fleet: each one is
        stored alone, and one that still fails is counted, logged and dropped."""
        for item in batch:
            try:
                self.ingest([item])
            except DatabaseUnavailable:
                raise
            except Exception as exc:
                self.malformed += 1
                log.error("dropped a message on %s that could not be stored: %r",
                          item.topic, exc)

    def ingest(self, batch: list[Received]) -> None:
        """Routes one batch by channel; each channel's rows go in one transaction."""
        by_channel: dict[Channel, list[tuple[str, bytes]]] = defaultdict(list)
        for item in batch:
            try:
                topic = self.schema.parse(item.topic)
            except ContractError as exc:
                self.malformed += 1
                log.warning("ignored a message on %s: %s", item.topic, exc)
                continue
            if topic.channel is Channel.CHUNK_REQUEST:
                try:
                    request = decode(ChunkRequest, item.payload)
                except ContractError as exc:
                    self.malformed += 1
                    log.warning("bad chunk request from %s: %s", topic.device_id, exc)
                    continue
                if request.device_id == topic.device_id:
                    try:
                        self.chunk_requests.put_nowait(request)
                    except queue.Full:
                        log.warning("chunk requests backed up; %s will ask again",
                                    topic.device_id)
                continue
            by_channel[topic.channel].append((topic.device_id, item.payload))
        # Presence and facts first: a new device exists before its telemetry refers to it.
        for channel in (Channel.PRESENCE, Channel.FACTS, Channel.HEARTBEAT, Channel.TELEMETRY,
                        Channel.STATUS):
            items = by_channel.get(channel)
            if not items:
                continue
            result = self.writers[channel].write(items)
            for rejected in result.malformed:
                self.malformed += 1
                log.warning("malformed %s from %s: %s", channel.value, rejected.device_id,
                            rejected.reason)

    # --- artifacts and rollouts ------------------------------------------------------------

    def _serve_chunks(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                request = self.chunk_requests.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.chunks.serve(request)
            except Exception:
                log.exception("serving %s to %s failed", request.artifact_id, request.device_id)

    def _keep_trust(self) -> None:
        """After a rotation (`edgefleet keys rotate` in another process) sign with the new key,
        and keep the key chain retained on the broker for devices that were offline; keep the
        revocation list from expiring, which would lock every device out of the broker."""
        keys = self.home / "keys"
        chain = chain_payload(keys)
        if self.link.connected and self._published_chain != (self.link.connections, chain):
            if chain != (self._published_chain or (0, b""))[1]:
                self.key = self.issuer.key = load_signing_key(keys)
            if self.link.publish(self.schema.key_chain, chain, qos=1, retain=True):
                self._published_chain = (self.link.connections, chain)
                log.info("key chain published (signing with %s)", self.key.key_id)
        now = time.time()
        if now >= self._next_crl_check and (self.home / "pki" / CA_KEY).exists():
            ca = FleetCA.load(self.home / "pki")
            if ca.crl_due(now):
                log.info("revocation list rewritten: %s", ca.write_crl())
            self._next_crl_check = now + 3600

    def _artifact_file(self, artifact_id: str) -> Path | None:
        if artifact_id not in self._files:
            with self.db.connect() as conn:
                file = conn.execute(select(Variant.file).where(
                    Variant.artifact_id == artifact_id)).scalar_one_or_none()
            self._files[artifact_id] = Path(file) if file else None
        return self._files[artifact_id]

    def _drive(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.tick_s):
            try:
                self._keep_trust()
            except Exception:
                log.exception("publishing the key chain or refreshing the CRL failed")
            try:
                for report in self.driver.tick_all():
                    if report.published:
                        log.info("%s: %s, %d commands sent", report.rollout_id, report.state,
                                 report.published)
            except Exception:
                log.exception("rollout tick failed; retrying at the next tick")
