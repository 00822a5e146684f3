"""The local inference loop: runs the active model on the input source, records every result in
the telemetry window and the active model's health, and swaps models between batches.

A swap is a reference handed to the loop; the loop picks it up before its next batch, so no
batch runs on a half-swapped model and no input is dropped. A model that raises or returns NaN
counts an error; the loop keeps going (the install watch decides what that means).
"""

from __future__ import annotations

import logging
import math
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
                # The shadow's health is taken with it: a batch in flight across set_shadow
                # is counted for the candidate that ran it, not for the next one.
                running, shadow, shadow_health = self._running, self._shadow, self.shadow_health
            if running is None:
                self._halt.wait(0.05)
                continue
            try:
                batch = self.source.next_batch()
            except Exception as exc:  # a bad input (e.g. drop files of mixed shapes) too
                log.warning("input source failed: %s", exc)
                self._halt.wait(0.5)
                continue
            if batch is None:
                self._halt.wait(0.05)
                continue
            self._infer(running, batch, shadow, shadow_health)
            if self.pace_s:
                self._halt.wait(self.pace_s)

    def _apply_swap(self) -> None:
        self._running = self._next
        self._next = None
        self._swap_pending = False
        self.health = Health()
        self._swapped.notify_all()

    def _infer(self, running: Running, batch: Batch, shadow: LoadedModel | None,
               shadow_health: Health) -> None:
        health = self.health
        n = len(batch.x)
        start = time.perf_counter()
        predicted: np.ndarray | None = None
        try:
            logits = running.model.predict(batch.x)
            elapsed = time.perf_counter() - start
            # In here too: an output of the wrong shape is the model's failure, and an
            # exception out of here would end the thread.
            _check_shape(logits, n)
            if _finite(logits):
                predicted = logits.argmax(axis=1)
        except Exception as exc:  # a broken model must not stop the loop
            elapsed = time.perf_counter() - start
            log.warning("model %s failed: %s", running.active.artifact_id, exc)
        failed = predicted is None
        per_sample_ms = elapsed * 1000 / max(n, 1)
        agreed = self._run_shadow(shadow, shadow_health, batch, predicted)
        # Per batch, not per sample: at batch 1 on a small model, each numpy call on one
        # element costs a few percent of the inference itself.
        correct = (None if predicted is None or batch.labels is None
                   else (predicted == batch.labels).tolist())
        agreements = None if agreed is None else agreed.tolist()
        record = self.window.record
        for i in range(n):
            record(per_sample_ms, correct=None if correct is None else correct[i],
                   agreed=None if agreements is None else agreements[i], error=failed)
        health.inferences += n
        if failed:
            health.errors += n
        health.latencies_ms.extend([per_sample_ms] * n)
        if correct is not None:
            health.labelled += n
            health.correct += sum(correct)

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


def _check_shape(output: np.ndarray, n: int) -> None:
    if output.ndim != 2 or len(output) != n:
        raise ValueError(f"output of shape {output.shape} is not [{n}, classes]")


def _finite(output: np.ndarray) -> bool:
    """Whether every value is finite. A classifier's few logits are checked in Python, where
    np.isfinite(...).all() costs more than the check is worth."""
    if output.size <= 64:
        return all(map(math.isfinite, output.ravel().tolist()))
    return bool(np.isfinite(output).all())
