"""The local inference loop: runs the active model on the input source, records every result in
the telemetry window and the active model's health, and swaps models between batches.

A swap is a reference handed to the loop; the loop picks it up before its next batch, so no
batch runs on a half-swapped model and no input is dropped. A model that raises or returns NaN
counts an error; the loop keeps going (the install watch decides what that means).
"""

from __future__ import annotations

import logging
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


@dataclass
class Health:
    """What one model did since it became active (or since shadowing began)."""

    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0
    agreed: int = 0
    compared: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

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
            previous = self.health
            if not self.is_alive():
                self._apply_swap()
            else:
                self._swapped.wait_for(lambda: not self._swap_pending, timeout=wait_s)
        return previous

    def set_shadow(self, candidate: LoadedModel | None) -> Health:
        with self._lock:
            previous = self.shadow_health
            self._shadow = candidate
            self.shadow_health = Health()
            return previous

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            with self._lock:
                if self._swap_pending:
                    self._apply_swap()
                running, shadow = self._running, self._shadow
            if running is None:
                self._halt.wait(0.05)
                continue
            batch = self.source.next_batch()
            if batch is None:
                self._halt.wait(0.05)
                continue
            self._infer(running, batch, shadow)
            if self.pace_s:
                self._halt.wait(self.pace_s)

    def _apply_swap(self) -> None:
        self._running = self._next
        self._next = None
        self._swap_pending = False
        self.health = Health()
        self._swapped.notify_all()

    def _infer(self, running: Running, batch: Batch, shadow: LoadedModel | None) -> None:
        health = self.health
        n = len(batch.x)
        start = time.perf_counter()
        try:
            logits = running.model.predict(batch.x)
            failed = not np.all(np.isfinite(logits))
        except Exception as exc:  # a broken model must not stop the loop
            log.warning("model %s failed: %s", running.active.artifact_id, exc)
            logits, failed = None, True
        per_sample_ms = (time.perf_counter() - start) * 1000 / max(n, 1)
        predicted = None if failed or logits is None else logits.argmax(axis=1)
        agreed = self._run_shadow(shadow, batch, predicted)
        for i in range(n):
            correct = None
            if batch.labels is not None and predicted is not None:
                correct = bool(predicted[i] == batch.labels[i])
            self.window.record(per_sample_ms, correct=correct,
                               agreed=None if agreed is None else bool(agreed[i]), error=failed)
            health.inferences += 1
            health.errors += failed
            health.latencies_ms.append(per_sample_ms)
            if correct is not None:
                health.labelled += 1
                health.correct += correct

    def _run_shadow(self, shadow: LoadedModel | None, batch: Batch,
                    predicted: np.ndarray | None) -> np.ndarray | None:
        if shadow is None or predicted is None:
            return None
        health = self.shadow_health
        start = time.perf_counter()
        try:
            candidate = shadow.predict(batch.x).argmax(axis=1)
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
