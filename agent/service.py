"""The agent process: wires config, state, runtimes, MQTT and the install runner together.

Threads: paho's network loop (agent.mqtt), the inference loop (agent.loop), the forwarder
(agent.forwarder), the installer (one install at a time), and the control loop here, which
routes inbound messages, closes telemetry windows, sends heartbeats and pets the watchdog.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from pathlib import Path

from agent.config import AgentConfig, InputSource
from agent.forwarder import Forwarder
from agent.inputs import DirectorySource, ReplaySource
from agent.install.runner import InstallContext, Installer, restore_current
from agent.loop import InferenceLoop
from agent.mqtt import AgentLink, Inbound, KeyChainUpdate, Malformed, Outgoing
from agent.outbox import open_recovering
from agent.slots import ModelStore
from agent.systemd import SystemdNotifier, watchdog_interval
from agent.telemetry import ResourceSampler, TelemetryWindow
from agent.trust import TrustStore
from edgefleet import __version__
from edgefleet.contract import (
    CHANNELS,
    ArtifactChunk,
    Channel,
    ChunkRequest,
    CommandState,
    CommandStatus,
    ConfigCommand,
    DeployCommand,
    DeviceFacts,
    Heartbeat,
    Manifest,
    Presence,
    PresenceState,
    RollbackCommand,
    ShadowCommand,
    encode,
)
from edgefleet.contract.signing import verify_manifest
from edgefleet.hardware import load_profiles, match_profile, probe_runtimes, read_hardware
from edgefleet.inference import load_model

log = logging.getLogger(__name__)

# What a config command may set an interval to. NaN fails both comparisons, so it is refused.
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 3600.0


class Agent:
    def __init__(self, config: AgentConfig, *, notifier: SystemdNotifier | None = None) -> None:
        self.config = config
        self.device_id = config.device_id
        self.topics = config.topics
        self.notifier = notifier or SystemdNotifier()
        self.started = time.monotonic()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        telemetry = config.telemetry
        self.outbox, moved = open_recovering(
            config.state_dir / "agent.db", max_rows=telemetry.outbox_max_rows,
            max_bytes=telemetry.outbox_max_bytes, max_age_s=telemetry.outbox_max_age_s)
        if moved is not None:
            log.error("the outbox was corrupt and moved to %s", moved)
        self.store = ModelStore(config.state_dir)
        self.trust = TrustStore(keys_dir=config.trust.keys_dir,
                                root_file=config.trust.root_file, state_dir=config.state_dir)
        self.hardware = read_hardware(config.hardware.root)
        profiles = load_profiles()
        match = match_profile(self.hardware, profiles)
        self.profile = (profiles.get(config.hardware.profile) if config.hardware.profile
                        else match.profile)
        self.runtimes = probe_runtimes()
        self.source = self._input_source()
        self.window = TelemetryWindow(time.time())
        self.resources = ResourceSampler(config.hardware.root)
        self.loop = InferenceLoop(self.source, self.window, pace_s=config.inference.pace_s)
        self.inbox: queue.Queue[Inbound | Malformed] = queue.Queue(maxsize=1024)
        self.link = AgentLink(self.device_id, config.broker, on_inbound=self._enqueue,
                              on_connection=self._connection_changed,
                              on_published=self._published, will=self._presence(False),
                              birth=self._birth)
        self.forwarder = Forwarder(self.outbox, self.link,
                                   max_inflight=telemetry.max_inflight)
        self.installer = Installer(InstallContext(
            device_id=self.device_id, topics=self.topics, store=self.store,
            outbox=self.outbox, loop=self.loop, source=self.source, settings=config.install,
            trusted_keys=self.trust.keys, retired_keys=self.trust.retired,
            max_model_bytes=self.profile.limits.max_model_bytes if self.profile else None,
            request_chunks=self._request_chunks, threads=config.inference.threads))
        self.deploys_waiting = threading.Event()
        self.telemetry_interval_s = telemetry.interval_s
        self.heartbeat_interval_s = telemetry.heartbeat_interval_s
        self.dropped_inbound = 0
        self.shadowing = threading.Lock()

    # --- start-up and the control loop -------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        self._start_current_model()
        self.loop.start()
        installer = threading.Thread(target=self._install_worker, args=(stop,),
                                     name="installer", daemon=True)
        installer.start()
        self.forwarder.start()
        self.link.start()
        self.notifier.ready(f"device {self.device_id}: {self._describe_model()}")
        pet_every = watchdog_interval() or 5.0
        next_window = time.monotonic() + self.telemetry_interval_s
        next_heartbeat = time.monotonic()
        next_pet = time.monotonic()
        try:
            while not stop.is_set():
                now = time.monotonic()
                # A config command may have shortened an interval: do not wait out the old one.
                next_window = min(next_window, now + self.telemetry_interval_s)
                next_heartbeat = min(next_heartbeat, now + self.heartbeat_interval_s)
                if now >= next_window:
                    self.close_window()
                    next_window = now + self.telemetry_interval_s
                if now >= next_heartbeat and self.link.connected:
                    self._publish_now(Channel.HEARTBEAT, Heartbeat(
                        device_id=self.device_id, ts=time.time(),
                        uptime_s=now - self.started))
                    next_heartbeat = now + self.heartbeat_interval_s
                if now >= next_pet:
                    # A dead inference thread is a dead agent: stop petting, systemd restarts.
                    if self.loop.is_alive():
                        self.notifier.watchdog()
                    else:
                        log.error("the inference loop died; withholding the watchdog")
                    next_pet = now + pet_every
                timeout = max(0.01, min(next_window, next_heartbeat, next_pet) - now)
                with contextlib.suppress(queue.Empty):
                    self._handle(self.inbox.get(timeout=min(timeout, 0.5)))
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        self.notifier.stopping()
        self.installer.cancel()
        self.close_window()
        self.loop.stop()
        self.forwarder.stop()
        self.forwarder.join(timeout=5)
        self.link.stop(farewell=self._presence(False))
        self.outbox.close()

    def _start_current_model(self) -> None:
        """Loads the current model, falling back to the previous one if it is damaged."""
        pointers = self.store.pointers()
        for candidate in (pointers.current, pointers.previous):
            if candidate is None:
                continue
            if not self.store.intact(candidate):
                log.error("model %s in slot %s is damaged; trying the previous one",
                          candidate.artifact_id, candidate.slot)
                continue
            try:
                if candidate is not pointers.current:
                    self.store.roll_back()
                restore_current(self.installer.ctx, candidate)
                return
            except Exception as exc:
                log.error("model %s does not load: %s", candidate.artifact_id, exc)
        log.warning("no working model installed yet: waiting for a deploy")

    def _install_worker(self, stop: threading.Event) -> None:
        self.installer.resume()
        while not stop.is_set():
            try:
                ran = self.installer.run_next()
            except Exception:
                # A dead installer thread would leave the agent alive but unable to install
                # anything, ever: log, pause, go on with the next deploy.
                log.exception("an install failed unexpectedly")
                stop.wait(1.0)
                continue
            if ran is None:
                self.deploys_waiting.wait(timeout=0.5)
                self.deploys_waiting.clear()
            self.forwarder.wake()

    # --- inbound ---------------------------------------------------------------------------

    def _enqueue(self, item: Inbound | Malformed | KeyChainUpdate) -> None:
        """Called on paho's thread; paho acknowledges the message when this returns."""
        if isinstance(item, KeyChainUpdate):
            # Here, not in the control loop: a deploy signed by a new key may be queued right
            # behind the list that introduces it, and the installer must see the list first.
            try:
                self.trust.apply_chain(item.payload)
            except Exception:      # paho's thread must survive whatever a payload does
                log.exception("could not apply a key chain")
            return
        if isinstance(item, Inbound) and isinstance(item.message, ArtifactChunk):
            try:  # chunks go straight to the installer; a full window is re-requested
                self.installer.chunks.put_nowait(item.message)
            except queue.Full:
                self.dropped_inbound += 1
            return
        if isinstance(item, Inbound) and isinstance(item.message, DeployCommand):
            if self.installer.enqueue(item.message, encode(item.message)):
                self.deploys_waiting.set()
                self.forwarder.wake()
            return
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self.dropped_inbound += 1
            log.warning("inbound queue full: dropped a message on %s", item.topic)

    def _handle(self, item: Inbound | Malformed) -> None:
        if isinstance(item, Malformed):
            log.warning("malformed message on %s: %s", item.topic, item.reason)
            if item.command_id:
                self._status(item.command_id, "unknown", CommandState.REJECTED,
                             f"malformed: {item.reason}")
            return
        message = item.message
        if isinstance(message, RollbackCommand):
            self._rollback(message)
        elif isinstance(message, ShadowCommand):
            if not self.shadowing.acquire(blocking=False):
                self._status(message.command_id, "shadow", CommandState.REJECTED,
                             "another shadow run is in progress")
                return
            threading.Thread(target=self._shadow, args=(message,), name="shadow",
                             daemon=True).start()
        elif isinstance(message, ConfigCommand):
            wanted = {"telemetry_interval_s": message.telemetry_interval_s,
                      "heartbeat_interval_s": message.heartbeat_interval_s}
            bad = [f"{name}={value}" for name, value in wanted.items()
                   if value is not None and not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S]
            if bad:
                self._status(message.command_id, "config", CommandState.REJECTED,
                             f"out of range ({MIN_INTERVAL_S}..{MAX_INTERVAL_S} s): "
                             + ", ".join(bad))
                return
            if message.telemetry_interval_s:
                self.telemetry_interval_s = message.telemetry_interval_s
            if message.heartbeat_interval_s:
                self.heartbeat_interval_s = message.heartbeat_interval_s
            self._status(message.command_id, "config", CommandState.SUCCEEDED, "applied")

    def _rollback(self, command: RollbackCommand) -> None:
        record = self.installer.current()
        if record is not None and not record.final:
            self.installer.cancel()
            self._status(command.command_id, "rollback", CommandState.SUCCEEDED,
                         f"cancelled install {record.command_id}: {command.reason}")
            return
        pointers = self.store.pointers()
        if pointers.previous is None or not self.store.intact(pointers.previous):
            self._status(command.command_id, "rollback", CommandState.FAILED,
                         "no previous model to roll back to")
            return
        failed = pointers.current
        pointers = self.store.roll_back(failed)
        restore_current(self.installer.ctx, pointers.current)
        if pointers.current is not None:
            # An explicit rollback is the only way back: the version floor follows it.
            self.outbox.set(f"accepted:{pointers.current.model_name}",
                            str(pointers.current.model_version).encode())
        self._status(command.command_id, "rollback", CommandState.SUCCEEDED,
                     f"now running {self._describe_model()}: {command.reason}")

    def _shadow(self, command: ShadowCommand) -> None:
        try:
            self._run_shadow(command)
        finally:
            self.shadowing.release()

    def _run_shadow(self, command: ShadowCommand) -> None:
        """Runs a candidate beside the active model and reports agreement and latency."""
        try:
            manifest = verify_manifest(bytes(command.manifest), self.trust.keys(),
                                       device_id=self.device_id, now=time.time(),
                                       retired=self.trust.retired())
        except Exception as exc:
            self._status(command.command_id, "shadow", CommandState.REJECTED, str(exc))
            return
        path = self._installed_file(manifest)
        if path is None:
            self._status(command.command_id, "shadow", CommandState.FAILED,
                         "shadow needs the candidate installed in a slot (deploy it first)")
            return
        try:
            candidate = load_model(path, manifest.runtime, threads=self.config.inference.threads)
        except Exception as exc:
            self._status(command.command_id, "shadow", CommandState.FAILED,
                         f"candidate does not load: {exc}")
            return
        self.loop.set_shadow(candidate)
        time.sleep(command.duration_s)
        health = self.loop.set_shadow(None)
        active_p95 = self.loop.health.p95_ms()
        agreement = health.agreement
        accuracy = health.accuracy
        self._status(command.command_id, "shadow", CommandState.SUCCEEDED,
                     f"shadow {manifest.artifact_id}: {health.inferences} inputs, agreement "
                     f"{'n/a' if agreement is None else f'{agreement:.4f}'}, accuracy "
                     f"{'n/a' if accuracy is None else f'{accuracy:.4f}'}, p95 "
                     f"{health.p95_ms() or 0:.3f} ms vs active {active_p95 or 0:.3f} ms")

    def _installed_file(self, manifest: Manifest) -> Path | None:
        pointers = self.store.pointers()
        for model in (pointers.current, pointers.previous):
            if model is not None and model.artifact_id == manifest.artifact_id:
                return self.store.path(model)
        return None

    # --- outbound --------------------------------------------------------------------------

    def close_window(self) -> None:
        """Closes the telemetry window and stores its batch in the outbox under a new seq."""
        model = self.loop.active
        resources = self.resources.sample()
        topic = self.topics.build(Channel.TELEMETRY, self.device_id)

        def payload(seq: int) -> bytes:
            batch = self.window.close(time.time(), device_id=self.device_id, seq=seq,
                                      model=model, execution=self.loop.execution,
                                      resources=resources,
                                      dropped_windows=self.outbox.dropped("telemetry"))
            return encode(batch)

        self.outbox.append_with_sequence(topic, payload, kind="telemetry")
        self.forwarder.wake()

    def _status(self, command_id: str, kind: str, state: CommandState, reason: str) -> None:
        status = CommandStatus(device_id=self.device_id, command_id=command_id, kind=kind,
                               state=state, ts=time.time(), reason=reason)
        self.outbox.append(self.topics.build(Channel.STATUS, self.device_id), encode(status),
                           kind="status")
        self.forwarder.wake()

    def _request_chunks(self, request: ChunkRequest) -> None:
        # Right after a restart the link may still be connecting: wait a little rather than
        # lose the request and sit out a whole chunk timeout.
        self.link.wait_connected(timeout=5.0)
        self._publish_now(Channel.CHUNK_REQUEST, request)

    def _publish_now(self, channel: Channel, message: Heartbeat | ChunkRequest) -> None:
        spec = CHANNELS[channel]
        self.link.publish(Outgoing(self.topics.build(channel, self.device_id), encode(message),
                                   spec.qos, spec.retain))

    def _presence(self, online: bool) -> Outgoing:
        spec = CHANNELS[Channel.PRESENCE]
        presence = Presence(device_id=self.device_id,
                            state=PresenceState.ONLINE if online else PresenceState.OFFLINE,
                            ts=time.time(), agent_version=__version__)
        return Outgoing(self.topics.build(Channel.PRESENCE, self.device_id), encode(presence),
                        spec.qos, spec.retain)

    def _birth(self) -> list[Outgoing]:
        spec = CHANNELS[Channel.FACTS]
        facts = DeviceFacts(device_id=self.device_id, ts=time.time(), hardware=self.hardware,
                            runtimes=self.runtimes,
                            profile=self.profile.name if self.profile else None,
                            agent_version=__version__, active_model=self.loop.active)
        return [self._presence(True),
                Outgoing(self.topics.build(Channel.FACTS, self.device_id), encode(facts),
                         spec.qos, spec.retain)]

    def _connection_changed(self, connected: bool) -> None:
        self.forwarder.connection_changed(connected)
        self.notifier.status(f"{'connected' if connected else 'disconnected'}; "
                             f"{self._describe_model()}")

    def _published(self, mid: int) -> None:
        self.forwarder.on_published(mid)

    def _describe_model(self) -> str:
        active = self.loop.active
        if active is None:
            return "no model yet"
        return (f"running {active.model_name} v{active.model_version} "
                f"({active.variant_kind.value}) on {self.loop.execution}")

    def _input_source(self) -> ReplaySource | DirectorySource:
        inference = self.config.inference
        if inference.source is InputSource.REPLAY:
            assert inference.replay_file is not None
            return ReplaySource(inference.replay_file, inference.batch_size)
        assert inference.directory is not None
        return DirectorySource(inference.directory, inference.batch_size)

