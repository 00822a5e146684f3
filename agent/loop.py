"""The local inference loop: runs the active model on the input source, records every result in
the telemetry window and the active model's health, and swaps models between batches.

A swap is a reference handed to the loop; the loop picks it up before its next batch, so no
batch runs on a half-swapped model and no input is dropped. A model that raises or returns NaN
counts an error; the loop keeps going (the install watch decides what that means).
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from agent.inputs import Batch, DirectorySource, ReplaySource
from agent.telemetry import TelemetryWindow
from edgefleet.contract import ActiveModel
from edgefleet.inference import LoadedModel

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 0.05
LATENCIES_KEPT = 2000        # per model's health: enough for a p95


@dataclass
class Health:
    """What one model did since it became active (or since shadowing began)."""

    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    agreed: int = 0
    compared: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))

    @property
    def error_rate(self) -> float:
        return self.errors / self.inferences if self.inferences else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def p95_ms(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else None


@dataclass(frozen=True)
class Running:
    model: LoadedModel
    active: ActiveModel


class InferenceLoop(threading.Thread):
    def __init__(self, source: ReplaySource | DirectorySource, window: TelemetryWindow, *,
                 pace_s: float = 0.0) -> None:
        super().__init__(name="inference", daemon=True)
        self.source = source
        self.window = window
        self.pace_s = pace_s
        self._lock = threading.Lock()
        self._next: Running | None = None
        self._swap_pending = False
        self._running: Running | None = None
        self._shadow: LoadedModel | None = None
        self.health = Health()
        self.shadow_health = Health()
        self._halt = threading.Event()
        self._swapped = threading.Condition(self._lock)
        # Results awaiting bookkeeping: (logits, labels, seconds the batch took), flushed
        # every FLUSH_EVERY_S and before any swap, so health and telemetry lag by at most that.
        # Three parallel lists rather than a tuple per batch: no allocation per batch that the
        # garbage collector has to track (at ~100k batches a second, its passes showed).
        self._outputs: list[np.ndarray] = []
        self._labels: list[np.ndarray | None] = []
        self._took: list[float] = []
        self._flush_at = 0.0
        self._shadowing: tuple[LoadedModel | None, Health] = (None, self.shadow_health)
        # Bumped by swap, set_shadow and stop: the loop reads this one attribute per batch and
        # looks at the rest only when it moved.
        self._changes = 0

    @property
    def active(self) -> ActiveModel | None:
        running = self._running
        return running.active if running else None

    @property
    def execution(self) -> str:
        running = self._running
        return running.model.execution if running else ""

    def swap(self, model: LoadedModel | None, active: ActiveModel | None,
             wait_s: float = 5.0) -> Health:
        """Hands the loop a new model; returns the outgoing model's health once it switched."""
        with self._lock:
            self._next = Running(model, active) if model and active else None
            self._swap_pending = True
            self._changes += 1
            previous = self.health
            if not self.is_alive():
                self._apply_swap()
            else:
                self._swapped.wait_for(lambda: not self._swap_pending, timeout=wait_s)
        return previous

    def set_shadow(self, candidate: LoadedModel | None) -> Health:
        with self._lock:
            previous = self.shadow_health
            self.shadow_health = Health()
            self._shadow = candidate
            # One tuple, swapped whole: the loop reads the candidate and its health together
            # without taking the lock on every batch.
            self._shadowing = (candidate, self.shadow_health)
            self._changes += 1
            return previous

    def stop(self) -> None:
        self._halt.set()
        self._changes += 1

    def run(self) -> None:
        # The hot path: on a small model at batch 1 every attribute lookup and call here is
        # a visible share of the inference. So the loop reads one counter per batch and the
        # shared state (without the lock) only when it moved, takes the lock only to apply a
        # swap, and runs the common case (no shadow) inline: the inference, its timing, one
        # append.
        halt = self._halt
        next_batch, perf = self.source.next_batch, time.perf_counter
        add_output, add_labels, add_took = (self._outputs.append, self._labels.append,
                                            self._took.append)
        pace = self.pace_s
        since_flush, spent = 0, 0.0      # batches and seconds since the clock was last read
        seen = -1
        running: Running | None = None
        predict = None
        shadow: LoadedModel | None = None
        shadow_health = self.shadow_health
        while True:
            if self._changes != seen:
                seen = self._changes     # read first: a change made meanwhile is seen next time
                if halt.is_set():
                    break
                if self._swap_pending:
                    with self._lock:
                        self._flush()    # the outgoing model's results go to its own health
                        self._apply_swap()
                running = self._running
                predict = running.model.predict if running is not None else None
                shadow, shadow_health = self._shadowing
            if running is None:
                halt.wait(0.05)
                continue
            since_flush += 1
            if shadow is not None:
                self._flush()
            elif since_flush >= 64 or spent >= FLUSH_EVERY_S:
                # The clock is read every 64 fast batches (not every one), or sooner when
                # batches are slow, so results still reach health within ~FLUSH_EVERY_S.
                since_flush, spent = 0, 0.0
                if time.monotonic() >= self._flush_at:
                    self._flush()
            try:
                batch = next_batch()
            except Exception as exc:  # a bad input (e.g. drop files of mixed shapes) too
                log.warning("input source failed: %s", exc)
                halt.wait(0.5)
                continue
            if batch is None:
                self._flush()
                halt.wait(0.05)
                continue
            if shadow is None:
                start = perf()
                try:
                    logits = predict(batch.x)  # type: ignore[misc]
                except Exception as exc:  # a broken model must not stop the loop
                    log.warning("model %s failed: %s", running.active.artifact_id, exc)
                    self._record_failures(len(batch.x))
                    continue
                # Checking, argmax and counting run vectorised over many batches in _flush.
                took = perf() - start
                add_output(logits)
                add_labels(batch.labels)
                add_took(took)
                spent += took
            else:
                self._infer_with_shadow(running, batch, shadow, shadow_health)
            if pace:
                halt.wait(pace)
                spent += pace
        self._flush()

    def _apply_swap(self) -> None:
        self._running = self._next
        self._next = None
        self._swap_pending = False
        self.health = Health()
        self._swapped.notify_all()

    def _infer_with_shadow(self, running: Running, batch: Batch, shadow: LoadedModel,
                           shadow_health: Health) -> None:
        n = len(batch.x)
        start = time.perf_counter()
        try:
            logits = running.model.predict(batch.x)
            elapsed = time.perf_counter() - start
        except Exception as exc:  # a broken model must not stop the loop
            log.warning("model %s failed: %s", running.active.artifact_id, exc)
            self._record_failures(n)
            return
        predicted = _predictions(logits, n)
        if predicted is None:
            self._record_failures(n)
            return
        agreed = self._run_shadow(shadow, shadow_health, batch, predicted)
        correct = None if batch.labels is None else int((predicted == batch.labels).sum())
        self.window.record_many(np.full(n, elapsed * 1000 / max(n, 1)), errors=0,
                                labelled=0 if correct is None else n, correct=correct or 0,
                                compared=0 if agreed is None else n,
                                agreed=0 if agreed is None else int(agreed.sum()))
        self._count(n, 0, [elapsed * 1000 / max(n, 1)] * n, correct, n)

    def _flush(self) -> None:
        """Accounts for the batches run since the last flush, all at once: one concatenate,
        one finiteness check, one argmax and one label comparison for all of them."""
        self._flush_at = time.monotonic() + FLUSH_EVERY_S
        # Copied and cleared in place: the loop holds the lists' append methods.
        outputs, label_batches, took = self._outputs[:], self._labels[:], self._took[:]
        self._outputs.clear()
        self._labels.clear()
        self._took.clear()
        if not outputs:
            return
        # Python-level work per batch here is what a flush costs at ~100k batches a second:
        # map runs in C; a shape problem shows up as concatenate refusing.
        try:
            # concatenate demands one rank of all: a 2-D result means every batch was 2-D.
            logits = np.concatenate(outputs)
            if logits.ndim != 2:
                raise ValueError("not [batch, classes]")
        except (ValueError, TypeError):
            for item in zip(outputs, label_batches, took, strict=True):  # odd shapes
                self._flush_one(*item)
            return
        sizes = np.fromiter(map(len, outputs), dtype=np.int64, count=len(outputs))
        seconds = np.array(took, dtype=np.float64)
        latencies = np.repeat(seconds * 1000 / np.maximum(sizes, 1), sizes)
        finite = np.isfinite(logits).all(axis=1)
        predicted = logits.argmax(axis=1)
        labelled = correct = 0
        if all(map(operator.is_not, label_batches, itertools.repeat(None))):
            labels: np.ndarray = np.concatenate(label_batches)  # type: ignore[arg-type]
            labelled = int(finite.sum())
            correct = int(((predicted == labels) & finite).sum())
        errors = int(len(finite) - finite.sum())
        ok_latencies = latencies[finite] if errors else latencies
        self.window.record_many(ok_latencies, errors=errors, labelled=labelled, correct=correct)
        # Only the newest LATENCIES_KEPT survive in the health's deque: convert no more.
        self._count(len(logits), errors, ok_latencies[-LATENCIES_KEPT:].tolist(),
                    correct if labelled else None, labelled)

    def _flush_one(self, logits: np.ndarray, labels: np.ndarray | None,
                   seconds: float) -> None:
        n = len(logits) if getattr(logits, "ndim", 0) else 1
        per_sample_ms = seconds * 1000 / max(n, 1)
        predicted = _predictions(logits, n)
        if predicted is None:
            self._record_failures(n)
            return
        correct = None if labels is None else int((predicted == labels).sum())
        self.window.record_many(np.full(n, per_sample_ms), errors=0,
                                labelled=0 if correct is None else n, correct=correct or 0)
        self._count(n, 0, [per_sample_ms] * n, correct, n if correct is not None else 0)

    def _record_failures(self, n: int) -> None:
        self.window.record_many(np.empty(0), errors=n, labelled=0, correct=0)
        self._count(n, n, [], None, 0)

    def _count(self, inferences: int, errors: int, latencies: list[float],
               correct: int | None, labelled: int) -> None:
        health = self.health
        health.inferences += inferences
        health.errors += errors
        health.latencies_ms.extend(latencies)
        if correct is not None:
            health.labelled += labelled
            health.correct += correct

    def _run_shadow(self, shadow: LoadedModel | None, health: Health, batch: Batch,
                    predicted: np.ndarray | None) -> np.ndarray | None:
        if shadow is None or predicted is None:
            return None
        start = time.perf_counter()
        try:
            output = shadow.predict(batch.x)
            _check_shape(output, len(batch.x))
            if not _finite(output):
                raise ValueError("returned NaN or infinity")
            candidate = output.argmax(axis=1)
        except Exception as exc:
            log.warning("shadow model failed: %s", exc)
            health.errors += len(batch.x)
            health.inferences += len(batch.x)
            return None
        per_sample_ms = (time.perf_counter() - start) * 1000 / max(len(batch.x), 1)
        agreed = candidate == predicted
        health.inferences += len(batch.x)
        health.compared += len(batch.x)
        health.agreed += int(agreed.sum())
        health.latencies_ms.extend([per_sample_ms] * len(batch.x))
        if batch.labels is not None:
            health.labelled += len(batch.x)
            health.correct += int((candidate == batch.labels).sum())
        return agreed


def _predictions(output: np.ndarray, n: int) -> np.ndarray | None:
    """Top-1 classes, or None when the output is not [n, classes] of finite numbers."""
    try:
        _check_shape(output, n)
        if not _finite(output):
            return None
        return np.asarray(output.argmax(axis=1))
    except Exception:
        return None


def _check_shape(output: np.ndarray, n: int) -> None:
    if output.ndim != 2 or len(output) != n:
        raise ValueError(f"output of shape {output.shape} is not [{n}, classes]")


def _finite(output: np.ndarray) -> bool:
    """Whether every value is finite. A classifier's few logits are checked in Python, where
    np.isfinite(...).all() costs more than the check is worth."""
    if output.size <= 64:
        return all(map(math.isfinite, output.ravel().tolist()))
    return bool(np.isfinite(output).all())
