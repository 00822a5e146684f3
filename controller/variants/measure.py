"""Measures a variant with the runtime its device would use: accuracy, agreement with the FP32
source, single-sample latency and batched throughput, and what actually ran."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import numpy as np

from controller.variants.source import EvalData
from edgefleet.contract import RuntimeRequirement
from edgefleet.inference import LoadedModel, load_model


class Measurement(msgspec.Struct, frozen=True, kw_only=True):
    accuracy: float                  # top-1 on the held-out split
    agreement: float | None          # top-1 agreement with the FP32 source's predictions
    latency_p50_ms: float            # one sample at a time
    latency_p95_ms: float
    throughput_ips: float            # inferences per second at `batch_size`
    batch_size: int
    execution: str                   # runtime/target that actually ran
    fallback_reason: str = ""        # why not on its first target, if so
    threads: int = 1
    samples: int = 0


def predictions(model: LoadedModel, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    step = model.fixed_batch or batch_size
    outputs = [model.predict(x[i:i + step]) for i in range(0, len(x), step)]
    return np.concatenate(outputs).argmax(axis=1)


def measure(path: Path, runtime: RuntimeRequirement, data: EvalData,
            reference: np.ndarray | None = None, *, threads: int = 1, latency_runs: int = 200,
            batch_size: int = 32) -> Measurement:
    """Runs the model on the evaluation split and times it.

    The measurement is allowed onto the CPU even when the manifest is not (FP16 is built for
    GPUs, but this machine may have none); `execution` and `fallback_reason` say where it ran.
    One thread by default, so that variants compare on equal terms on a busy build machine.
    """
    model = load_model(path, msgspec.structs.replace(runtime, cpu_fallback=True),
                       threads=threads)
    predicted = predictions(model, data.eval_x)
    accuracy = float((predicted == data.eval_y).mean())
    agreement = None if reference is None else float((predicted == reference).mean())

    samples = data.eval_x
    for i in range(10):  # warm-up: first runs allocate and pick kernels
        model.predict(samples[i % len(samples)][None])
    timings = []
    for i in range(latency_runs):
        sample = samples[i % len(samples)][None]
        start = time.perf_counter()
        model.predict(sample)
        timings.append((time.perf_counter() - start) * 1000)

    batch = model.fixed_batch or batch_size
    rounds = max(1, 256 // batch)
    batch_input = np.resize(samples, (batch, *samples.shape[1:]))
    model.predict(batch_input)  # warm-up at this batch size
    start = time.perf_counter()
    for _ in range(rounds):
        model.predict(batch_input)
    elapsed = time.perf_counter() - start
    return Measurement(
        accuracy=accuracy, agreement=agreement,
        latency_p50_ms=float(np.percentile(timings, 50)),
        latency_p95_ms=float(np.percentile(timings, 95)),
        throughput_ips=rounds * batch / elapsed, batch_size=batch, execution=model.execution,
        fallback_reason=model.fallback_reason, threads=threads, samples=len(data.eval_x))
