"""Runs installs: the action of each state, with the state persisted before the action runs.

The record and the status report of each transition are written in one outbox transaction, so
a status is sent exactly once per transition and the final outcome exactly once, crash or not.
One install runs at a time, on the installer's own thread; the control thread hands it chunks
and can cancel it (a rollback command).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import msgspec
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import InstallConfig
from agent.download import Download, DownloadError
from agent.inputs import DirectorySource, ReplaySource
from agent.install.machine import Event, InstallRecord, outcome, recover, step
from agent.loop import InferenceLoop
from agent.outbox import Outbox
from agent.slots import InstalledModel, ModelStore, prepare_download_dir
from edgefleet.contract import (
    ArtifactChunk,
    ChunkRequest,
    CommandState,
    CommandStatus,
    ContractError,
    DeployCommand,
    InstallStage,
    Manifest,
    ManifestRejected,
    TopicSchema,
    decode,
    encode,
)
from edgefleet.contract.signing import key_id, verify_manifest
from edgefleet.contract.topics import Channel
from edgefleet.inference import LoadedModel, RuntimeUnavailable, load_model

log = logging.getLogger(__name__)
S = InstallStage
RECORD_KEY = "install"
QUEUE_KEY = "deploy-queue"     # deploy commands received and not yet started, oldest first
# Test-only: the install state (its value) after whose commit the agent SIGKILLs itself.
CRASH_AT_ENV = "EDGEFLEET_TEST_CRASH_AT"


# Command ids remembered to drop redeliveries: far more than a broker redelivers (its queue for
# one device is bounded too), few enough that a storm of ids cannot grow the state file.
SEEN_KEPT = 10_000


class StepFailed(Exception):
    """An action's failure, with the reason that goes into the status report."""


@dataclass(frozen=True)
class InstallContext:
    device_id: str
    topics: TopicSchema
    store: ModelStore
    outbox: Outbox
    loop: InferenceLoop
    source: ReplaySource | DirectorySource
    settings: InstallConfig
    trusted_keys: Callable[[], Mapping[str, Ed25519PublicKey]]
    max_model_bytes: int | None
    request_chunks: Callable[[ChunkRequest], None]
    threads: int = 1
    clock: Callable[[], float] = time.time
    retired_keys: Callable[[], Collection[str]] = frozenset


class Installer:
    def __init__(self, ctx: InstallContext) -> None:
        self.ctx = ctx
        self.chunks: queue.Queue[ArtifactChunk] = queue.Queue(maxsize=256)
        self._cancel = threading.Event()
        self._candidate: LoadedModel | None = None
        self._baseline_p95: float | None = None
        self._command: DeployCommand | None = None
        self._busy = threading.Lock()
        self._enqueued = 0

    # --- entry points --------------------------------------------------------------------

    def current(self) -> InstallRecord | None:
        raw = self.ctx.outbox.get(RECORD_KEY)
        return None if raw is None else msgspec.msgpack.decode(raw, type=InstallRecord)

    def enqueue(self, command: DeployCommand, raw_command: bytes) -> bool:
        """Stores a received deploy durably, with its 'accepted' status, before the broker is
        acknowledged (paho sends PUBACK when the message callback returns), so a crash cannot
        lose a command the broker considers delivered. A redelivered command id is ignored."""
        seen = f"seen:{command.command_id}"
        with self.ctx.outbox.transaction():
            if self.ctx.outbox.get(seen) is not None:
                return False
            self.ctx.outbox.set(seen, b"1")
            # Bounded, so a storm of deploys cannot fill the disk (or make each enqueue, which
            # rewrites the queue, slower): past the limit a deploy is refused, and says so.
            queued = self._queue()
            if len(queued) >= self.ctx.settings.max_queued_deploys:
                self._report(command.command_id, CommandState.REJECTED, None,
                             f"deploy queue full ({len(queued)} waiting); send it again later")
                accepted = False
            else:
                self._set_queue([*queued, raw_command])
                self._note_signer(command)
                self._report(command.command_id, CommandState.ACCEPTED, None, "queued")
                accepted = True
            self._enqueued += 1
            if self._enqueued % 256 == 0:
                self.ctx.outbox.forget_oldest("seen:", keep=SEEN_KEPT)
        return accepted

    def _note_signer(self, command: DeployCommand) -> None:
        """Keeps the public key that signed a deploy, if it is trusted as the deploy arrives.
        A rotation that reaches the device while the deploy waits in the queue (both were
        queued in its session while it was offline) then does not void it: the deploy was
        good when it came, and its bytes are ours since."""
        try:
            manifest = verify_manifest(bytes(command.manifest), self.ctx.trusted_keys(),
                                       device_id=self.ctx.device_id, now=self.ctx.clock(),
                                       retired=self.ctx.retired_keys())
        except ManifestRejected:
            return       # _verify says why, in order
        key = self.ctx.trusted_keys()[manifest.key_id]
        self.ctx.outbox.set(f"signer:{command.command_id}", key.public_bytes_raw())

    def _keys_for(self, command_id: str) -> dict[str, Ed25519PublicKey]:
        keys = dict(self.ctx.trusted_keys())
        raw = self.ctx.outbox.get(f"signer:{command_id}")
        if raw is not None:
            signer = Ed25519PublicKey.from_public_bytes(raw)
            keys[key_id(signer)] = signer
        return keys

    def run_next(self) -> InstallRecord | None:
        """Starts the oldest queued deploy and runs it to a final state."""
        with self._busy:
            # The queue is read inside the transaction that shortens it: read before it, a
            # deploy that paho's thread enqueued meanwhile would be written out of the queue
            # (and, being marked seen, ignored when redelivered).
            with self.ctx.outbox.transaction():   # taken off the queue exactly when it starts
                queued = self._queue()
                if not queued:
                    return None
                self._cancel.clear()
                try:
                    command = decode(DeployCommand, queued[0])
                except ContractError as exc:
                    # Stored by an older agent or damaged on disk: dropped, or it would stop
                    # every install after it, on every start.
                    log.error("dropped an unreadable queued deploy: %s", exc)
                    self._set_queue(queued[1:])
                    return None
                manifest = _peek_manifest(bytes(command.manifest))
                record = InstallRecord(command_id=command.command_id, command=queued[0],
                                       model_name=manifest.model_name if manifest else "",
                                       model_version=manifest.model_version if manifest else 0)
                self._save(record)
                self._set_queue(queued[1:])
            _crash_if_asked(record.state)
            return self._drive(record)

    def _queue(self) -> list[bytes]:
        raw = self.ctx.outbox.get(QUEUE_KEY)
        return [] if raw is None else msgspec.msgpack.decode(raw, type=list[bytes])

    def _set_queue(self, queued: list[bytes]) -> None:
        self.ctx.outbox.set(QUEUE_KEY, msgspec.msgpack.encode(queued))

    def resume(self) -> InstallRecord | None:
        """At start-up: continue an install that a restart interrupted, by the recovery table."""
        record = self.current()
        if record is None:
            return None
        if record.final:
            if not record.outcome_reported:
                self._persist(record)
            return record
        with self._busy:
            resumed = recover(record)
            log.info("resuming install %s: %s -> %s", record.command_id, record.state.value,
                     resumed.state.value)
            self._persist(resumed)
            return self._drive(resumed)

    def cancel(self) -> None:
        self._cancel.set()

    # --- the drive loop ------------------------------------------------------------------

    def _drive(self, record: InstallRecord) -> InstallRecord:
        self._command = decode(DeployCommand, record.command)
        actions: dict[InstallStage, Callable[[InstallRecord], None]] = {
            S.RECEIVED: self._verify, S.VERIFIED: lambda r: None,
            S.DOWNLOADING: self._download, S.STAGED: self._smoke_test,
            S.SMOKE_TESTED: self._activate, S.ACTIVATED: self._start_watch,
            S.WATCHING: self._watch, S.ROLLING_BACK: self._roll_back,
        }
        while not record.final:
            event, reason = Event.OK, ""
            try:
                if self._cancel.is_set() and record.state is not S.ROLLING_BACK:
                    raise _Cancelled("cancelled by a rollback command")
                actions[record.state](record)
            except _Cancelled as exc:
                event, reason = Event.CANCELLED, str(exc)
            except StepFailed as exc:
                event, reason = Event.FAILED, str(exc)
            except Exception as exc:  # an unexpected error is a failure of this step
                log.exception("install step %s crashed", record.state.value)
                event, reason = Event.FAILED, f"{type(exc).__name__}: {exc}"
            record = step(record, event, reason)
            self._persist(record)
        self._finish(record)
        return record

    def _persist(self, record: InstallRecord) -> None:
        """Saves the record and queues its status report in one transaction."""
        self._save(record)
        _crash_if_asked(record.state)

    def _save(self, record: InstallRecord) -> None:
        """`_persist` without the test hook, for a caller that commits a larger transaction."""
        final = record.final and not record.outcome_reported
        if final:
            record = msgspec.structs.replace(record, outcome_reported=True)
        with self.ctx.outbox.transaction():
            self.ctx.outbox.set(RECORD_KEY, msgspec.msgpack.encode(record))
            if final and record.state is S.COMMITTED:
                # The version floor rises with the commit, in its transaction: set before it, a
                # crash would roll the model back and leave the floor at the version refused.
                self.ctx.outbox.set(f"accepted:{record.model_name}",
                                    str(record.model_version).encode())
            if final or not record.final:
                self._report(record.command_id,
                             outcome(record) if record.final else CommandState.IN_PROGRESS,
                             record, record.reason)

    def _report(self, command_id: str, state: CommandState, record: InstallRecord | None,
                reason: str) -> None:
        status = CommandStatus(
            device_id=self.ctx.device_id, command_id=command_id, kind="deploy", state=state,
            ts=self.ctx.clock(), stage=record.state if record else None,
            model_name=(record.model_name or None) if record else None,
            model_version=(record.model_version or None) if record else None, reason=reason)
        self.ctx.outbox.append(self.ctx.topics.build(Channel.STATUS, self.ctx.device_id),
                               encode(status), kind="status")

    # --- actions, one per state ------------------------------------------------------------

    def _manifest(self) -> Manifest:
        assert self._command is not None
        return decode(Manifest, bytes(self._command.manifest))

    def _verify(self, record: InstallRecord) -> None:
        assert self._command is not None
        command_id = self._command.command_id
        try:
            manifest = verify_manifest(bytes(self._command.manifest), self._keys_for(command_id),
                                       device_id=self.ctx.device_id, now=self.ctx.clock(),
                                       retired=self.ctx.retired_keys())
        except ManifestRejected as exc:
            raise StepFailed(f"manifest rejected: {exc.reason}: {exc.got}") from None
        finally:
            self.ctx.outbox.delete(f"signer:{command_id}")
        accepted = self._accepted_version(manifest.model_name)
        if manifest.model_version <= accepted:
            raise StepFailed(f"replayed: version {manifest.model_version} is not newer than "
                             f"the accepted version {accepted}")
        if self.ctx.outbox.get(f"failed:{manifest.artifact_id}") is not None:
            raise StepFailed(f"{manifest.artifact_id} was rolled back before; not retried "
                             "automatically")
        limit = self.ctx.max_model_bytes
        if limit is not None and manifest.size_bytes > limit:
            raise StepFailed(f"artifact of {manifest.size_bytes} bytes exceeds the profile's "
                             f"limit of {limit}")

    def _download(self, record: InstallRecord) -> None:
        manifest = self._manifest()
        staged = self._staged(manifest)
        if staged is not None:
            return  # a restart after staging: the file is already in its slot
        download = Download(prepare_download_dir(self.ctx.store.root.parent), manifest)
        settings = self.ctx.settings
        deadline = time.monotonic() + settings.download_timeout_s
        try:
            while not download.complete:
                if self._cancel.is_set():
                    raise _Cancelled("cancelled by a rollback command")
                if time.monotonic() > deadline:
                    raise StepFailed(f"download timed out with {download.received}/"
                                     f"{download.total} chunks")
                wanted = download.missing(settings.chunk_window)
                self.ctx.request_chunks(ChunkRequest(
                    device_id=self.ctx.device_id, artifact_id=manifest.artifact_id,
                    first=wanted[0], count=wanted[-1] - wanted[0] + 1))
                self._receive_window(download, set(wanted), settings.chunk_timeout_s)
                download.checkpoint()
            path = download.finish()
        except DownloadError as exc:
            raise StepFailed(f"download failed: {exc}") from None
        finally:
            download.close()
        self.ctx.store.stage(path, bytes(self._command.manifest) if self._command else b"",
                             manifest)

    def _receive_window(self, download: Download, wanted: set[int], timeout_s: float) -> None:
        until = time.monotonic() + timeout_s
        while wanted and time.monotonic() < until:
            try:
                chunk = self.chunks.get(timeout=max(0.01, min(0.5, until - time.monotonic())))
            except queue.Empty:
                if self._cancel.is_set():
                    return
                continue
            problem = download.accept(chunk)
            if problem is not None:
                log.warning("refused a chunk: %s", problem)
                continue
            wanted.discard(chunk.index)

    def _staged(self, manifest: Manifest) -> InstalledModel | None:
        slot = self.ctx.store.inactive_slot()
        suffix = ".tflite" if manifest.file_format.value == "tflite" else ".onnx"
        candidate = InstalledModel(
            slot=slot, file=f"model{suffix}",
            manifest=bytes(self._command.manifest) if self._command else b"",
            artifact_id=manifest.artifact_id, model_name=manifest.model_name,
            model_version=manifest.model_version, sha256=manifest.sha256)
        return candidate if self.ctx.store.intact(candidate) else None

    def _smoke_test(self, record: InstallRecord) -> None:
        manifest = self._manifest()
        staged = self._staged(manifest)
        if staged is None:
            raise StepFailed("staged file missing or does not match its sha256")
        try:
            model = load_model(self.ctx.store.path(staged), manifest.runtime,
                               threads=self.ctx.threads)
        except RuntimeUnavailable as exc:
            raise StepFailed(f"cannot run here: {exc}") from None
        except Exception as exc:
            raise StepFailed(f"does not load: {type(exc).__name__}: {exc}") from None
        samples = self.ctx.source.samples(self.ctx.settings.smoke_samples)
        if samples is not None:
            latencies = []
            predictions = []
            for row in samples.x:
                start = time.perf_counter()
                try:
                    out = model.predict(row[None])
                except Exception as exc:
                    raise StepFailed(f"crashed on a validation sample: {exc}") from None
                latencies.append((time.perf_counter() - start) * 1000)
                if not np.all(np.isfinite(out)):
                    raise StepFailed("returned NaN or infinity on a validation sample")
                predictions.append(int(out.argmax()))
            p95 = float(np.percentile(latencies, 95))
            # Build-machine latency is only a hint of a device's: a Pi is many times slower.
            limit = self.ctx.settings.smoke_max_latency_ms or (
                20 * (manifest.metrics.latency_p95_ms or 10.0) + 20.0)
            if p95 > limit:
                raise StepFailed(f"too slow: p95 {p95:.2f} ms > limit {limit:.2f} ms")
            floor = self._command.min_accuracy if self._command else None
            if samples.labels is not None and floor is not None:
                accuracy = float(np.mean(np.array(predictions) == samples.labels))
                if accuracy < floor:
                    raise StepFailed(f"accuracy {accuracy:.4f} on {len(predictions)} "
                                     f"validation samples is below the floor {floor:.4f}")
        self._candidate = model

    def _activate(self, record: InstallRecord) -> None:
        manifest = self._manifest()
        staged = self._staged(manifest)
        if staged is None or self._candidate is None:
            raise StepFailed("nothing staged to activate")
        self.ctx.store.activate(staged)
        previous = self.ctx.loop.swap(self._candidate, staged.active(manifest))
        self._baseline_p95 = previous.p95_ms()

    def _start_watch(self, record: InstallRecord) -> None:
        if self.ctx.loop.active is None:
            raise StepFailed("the new model is not running")

    def _watch(self, record: InstallRecord) -> None:
        settings = self.ctx.settings
        watch_s = self._command.watch_s if self._command else 60.0
        floor = self._command.min_accuracy if self._command else None
        end = time.monotonic() + watch_s
        log.info("watching %s for %.1f s (previous model's p95: %s ms)", record.command_id,
                 watch_s, "unknown" if self._baseline_p95 is None
                 else f"{self._baseline_p95:.3f}")
        while time.monotonic() < end:
            if self._cancel.wait(min(0.25, max(0.0, end - time.monotonic()))):
                raise _Cancelled("cancelled by a rollback command")
            problem = _unhealthy(self.ctx.loop, settings, self._baseline_p95, floor)
            if problem:
                raise StepFailed(problem)
        health = self.ctx.loop.health
        log.info("watch of %s passed: %d inferences, %d errors, p95 %s ms, accuracy %s",
                 record.command_id, health.inferences, health.errors, health.p95_ms(),
                 health.accuracy)
        if health.inferences == 0 and isinstance(self.ctx.source, ReplaySource):
            raise StepFailed("no inference completed in the watch window")

    def _roll_back(self, record: InstallRecord) -> None:
        manifest = _peek_manifest(bytes(self._command.manifest)) if self._command else None
        pointers = self.ctx.store.pointers()
        failed = pointers.current if (
            pointers.current is not None and manifest is not None
            and pointers.current.artifact_id == manifest.artifact_id) else None
        if failed is not None:
            pointers = self.ctx.store.roll_back(failed)
        restore_current(self.ctx, pointers.current)
        if manifest is not None:
            self.ctx.outbox.set(f"failed:{manifest.artifact_id}", b"1")

    def _finish(self, record: InstallRecord) -> None:
        self._candidate = None
        if record.state is S.REJECTED:
            manifest = _peek_manifest(bytes(self._command.manifest)) if self._command else None
            if manifest is not None and record.failed_in is S.DOWNLOADING:
                downloads = self.ctx.store.root.parent / "downloads"
                for leftover in downloads.glob(f"{manifest.artifact_id}.*"):
                    leftover.unlink(missing_ok=True)

    def _accepted_version(self, model_name: str) -> int:
        raw = self.ctx.outbox.get(f"accepted:{model_name}")
        return int(raw) if raw else 0


class _Cancelled(Exception):
    pass


def _crash_if_asked(state: InstallStage) -> None:
    """Test hook: with EDGEFLEET_TEST_CRASH_AT=<state value> in the environment, the agent
    SIGKILLs itself right after that state's record is committed, so the crash tests can stop
    an install in a chosen state. Call it only after the commit, never inside a transaction."""
    if os.environ.get(CRASH_AT_ENV) == state.value:
        log.warning("%s=%s: killing the agent now (test hook)", CRASH_AT_ENV, state.value)
        os.kill(os.getpid(), signal.SIGKILL)


def _peek_manifest(raw: bytes) -> Manifest | None:
    try:
        return decode(Manifest, raw)
    except Exception:
        return None


def _unhealthy(loop: InferenceLoop, settings: InstallConfig, baseline_p95: float | None,
               floor: float | None) -> str | None:
    health = loop.health
    if health.inferences >= 20 and health.error_rate > settings.watch_max_error_rate:
        return (f"error rate {health.error_rate:.1%} over {health.inferences} inferences "
                f"exceeds {settings.watch_max_error_rate:.1%}")
    p95 = health.p95_ms()
    if (baseline_p95 and p95 is not None and health.inferences >= 50
            and p95 > settings.watch_max_latency_factor * baseline_p95
            and p95 - baseline_p95 > settings.watch_min_latency_increase_ms):
        return (f"p95 latency {p95:.2f} ms is over {settings.watch_max_latency_factor:g}x the "
                f"previous model's {baseline_p95:.2f} ms")
    accuracy = health.accuracy
    if floor is not None and accuracy is not None and health.labelled >= 50 and accuracy < floor:
        return (f"on-device accuracy {accuracy:.4f} over {health.labelled} labelled inputs is "
                f"below the floor {floor:.4f}")
    return None


def restore_current(ctx: InstallContext, current: InstalledModel | None) -> None:
    """Loads the model the pointers name as current into the loop (None: run nothing)."""
    if current is None:
        ctx.loop.swap(None, None)
        return
    manifest = decode(Manifest, current.manifest)
    model = load_model(ctx.store.path(current), manifest.runtime, threads=ctx.threads)
    ctx.loop.swap(model, current.active(manifest))
