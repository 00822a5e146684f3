"""agent.loop with real onnxruntime models on the digits replay set: every inference is recorded
in the telemetry window and the model's health, a swap loses no batch, broken models count
errors while the loop keeps going, shadow mode measures agreement; and agent.inputs'
DirectorySource feeding it from a real drop folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.inputs import Batch, DirectorySource, ReplaySource
from agent.loop import InferenceLoop
from agent.telemetry import TelemetryWindow
from edgefleet.contract import (
    ActiveModel,
    Runtime,
    RuntimeRequirement,
    TelemetryBatch,
    VariantKind,
)
from edgefleet.inference import LoadedModel, load_model
from tests.model_builders import (
    constant_model,
    nan_model,
    one_value_model,
    pairs_model,
    raising_model,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "artifacts/digits/digits.fp32.onnx"
DATA = ROOT / "artifacts/digits/digits.data.npz"
ONNX_CPU = RuntimeRequirement(runtime=Runtime.ONNXRUNTIME, targets=("CPUExecutionProvider",))


def active(version: int, artifact_id: str | None = None) -> ActiveModel:
    return ActiveModel(model_name="digits", model_version=version,
                       variant_kind=VariantKind.ONNX_FP32,
                       artifact_id=artifact_id or f"digits-v{version}")


def load(path: Path = MODEL) -> LoadedModel:
    return load_model(path, ONNX_CPU, threads=1)



class CountingReplay(ReplaySource):
    """The real replay source, counting the batches it handed out."""

    def __init__(self, path: Path, batch_size: int) -> None:
        super().__init__(path, batch_size)
        self.batches = 0

    def next_batch(self) -> Batch:
        self.batches += 1
        return super().next_batch()


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.005)


def close(window: TelemetryWindow) -> TelemetryBatch:
    return window.close(time.time(), device_id="pi-0001", seq=0, model=None, execution="",
                        resources=None, dropped_windows=0)


@pytest.fixture
def window() -> TelemetryWindow:
    return TelemetryWindow(time.time())


@pytest.fixture
def running(window: TelemetryWindow) -> Iterator[InferenceLoop]:
    loop = InferenceLoop(CountingReplay(DATA, batch_size=3), window)
    loop.start()
    yield loop
    loop.stop()
    loop.join(timeout=10)
    assert not loop.is_alive()


def test_every_inference_is_recorded_in_the_window_and_the_health_with_its_accuracy(
        running: InferenceLoop, window: TelemetryWindow) -> None:
    running.swap(load(), active(1))
    wait_until(lambda: running.health.inferences >= 1200, what="1200 inferences")
    running.stop()
    running.join(timeout=10)

    batch = close(window)
    health = running.health

    assert batch.inferences == health.inferences == health.labelled == batch.labelled
    assert (batch.errors, health.errors) == (0, 0)
    assert health.accuracy == pytest.approx(batch.accuracy)
    assert batch.accuracy == pytest.approx(0.98, abs=0.015)
    assert batch.latency is not None and 0 < batch.latency.p50_ms <= batch.latency.max_ms
    assert (health.p95_ms() or 0) > 0
    assert running.active == active(1)
    assert running.execution == "onnxruntime/CPUExecutionProvider"


def test_a_swap_happens_between_batches_and_loses_none(running: InferenceLoop,
                                                       window: TelemetryWindow) -> None:
    source = running.source
    assert isinstance(source, CountingReplay)
    running.swap(load(), active(1))
    wait_until(lambda: running.health.inferences >= 300, what="300 inferences on v1")
    first_window = close(window)
    old_health = running.health

    returned = running.swap(load(), active(2))

    assert returned is old_health
    assert running.active == active(2)
    counted_for_v1 = returned.inferences
    wait_until(lambda: running.health.inferences >= 300, what="300 inferences on v2")
    running.stop()
    running.join(timeout=10)
    second_window = close(window)

    recorded = first_window.inferences + second_window.inferences
    assert recorded == source.batches * 3                      # no batch lost or half-recorded
    assert recorded == returned.inferences + running.health.inferences
    assert returned.inferences == counted_for_v1               # v1 stopped at the swap
    assert returned.inferences % 3 == 0 and running.health.inferences % 3 == 0
    assert returned.errors == running.health.errors == 0


@pytest.mark.parametrize("broken", [raising_model, nan_model, one_value_model, pairs_model],
                         ids=["raises", "returns-nan", "one-value-per-input", "extra-axis"])
def test_a_broken_model_counts_errors_and_the_loop_keeps_running(
        running: InferenceLoop, window: TelemetryWindow, tmp_path: Path,
        broken: Callable[[Path], Path]) -> None:
    running.swap(load(broken(tmp_path)), active(2))
    wait_until(lambda: running.health.errors >= 60, what="60 errors")

    bad = running.swap(load(), active(1))
    wait_until(lambda: running.health.inferences >= 60, what="60 good inferences")
    assert running.is_alive()
    running.stop()
    running.join(timeout=10)
    batch = close(window)

    assert bad.errors == bad.inferences and bad.error_rate == 1.0
    assert bad.labelled == 0 and bad.accuracy is None      # a failed inference has no answer
    assert running.health.errors == 0
    assert batch.errors == bad.errors
    assert batch.inferences == bad.inferences + running.health.inferences
    assert batch.accuracy == pytest.approx(running.health.accuracy)


def test_a_shadow_of_the_same_model_agrees_on_every_input(running: InferenceLoop,
                                                         window: TelemetryWindow) -> None:
    running.swap(load(), active(1))
    running.set_shadow(load())
    wait_until(lambda: running.shadow_health.compared >= 300, what="300 shadowed inferences")

    shadow = running.set_shadow(None)
    running.stop()
    running.join(timeout=10)
    batch = close(window)

    assert shadow.agreement == 1.0
    assert shadow.errors == 0
    assert shadow.accuracy == pytest.approx(0.98, abs=0.02)
    assert batch.agreement == 1.0 and batch.inferences >= shadow.compared
    assert running.shadow_health.compared <= 3     # at most the batch in flight at the switch


def test_a_shadow_that_disagrees_is_measured_and_a_failing_one_leaves_the_active_model_alone(
        running: InferenceLoop, tmp_path: Path) -> None:
    running.swap(load(), active(1))
    running.set_shadow(load(constant_model(tmp_path)))
    wait_until(lambda: running.shadow_health.compared >= 450, what="450 shadowed inferences")
    constant = running.set_shadow(load(raising_model(tmp_path)))
    wait_until(lambda: running.shadow_health.errors >= 30, what="30 shadow errors")
    failing = running.set_shadow(None)

    # Class 0 is a tenth of the digits: an always-0 model agrees with a good one about as often.
    assert constant.agreement is not None and 0.05 < constant.agreement < 0.15
    assert constant.accuracy is not None and 0.05 < constant.accuracy < 0.15
    assert failing.errors == failing.inferences and failing.compared == 0
    assert running.health.errors == 0 and running.is_alive()


def test_a_shadow_returning_nan_counts_errors_not_disagreements(running: InferenceLoop,
                                                               tmp_path: Path) -> None:
    running.swap(load(), active(1))
    running.set_shadow(load(nan_model(tmp_path)))
    wait_until(lambda: running.shadow_health.inferences >= 60, what="60 shadowed inferences")

    shadow = running.set_shadow(None)

    assert shadow.errors == shadow.inferences and shadow.compared == 0
    assert shadow.agreement is None
    assert running.health.errors == 0


def test_swapping_to_no_model_stops_inferring_but_not_the_thread(
        running: InferenceLoop, window: TelemetryWindow) -> None:
    running.swap(load(), active(1))
    wait_until(lambda: running.health.inferences >= 30)

    last = running.swap(None, None)
    close(window)
    time.sleep(0.3)

    assert running.is_alive()
    assert running.active is None and running.execution == ""
    assert running.health.inferences == 0
    assert close(window).inferences == 0
    assert last.inferences >= 30

    running.swap(load(), active(1))
    wait_until(lambda: running.health.inferences >= 30, what="inference after the pause")


def test_a_swap_before_the_thread_starts_applies_at_once(window: TelemetryWindow) -> None:
    loop = InferenceLoop(ReplaySource(DATA), window)
    loop.swap(load(), active(1), wait_s=0.0)
    assert loop.active == active(1)


# --- agent.inputs.DirectorySource -----------------------------------------------------------

def drop(directory: Path, name: str, array: np.ndarray) -> Path:
    """Writes like a well-behaved producer: a temp name, then a rename into place."""
    tmp = directory / f".{name}.partial"
    with tmp.open("wb") as f:
        np.save(f, array)
    return tmp.rename(directory / name)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_the_directory_source_takes_new_npy_files_and_marks_them_done_or_bad(
        tmp_path: Path, window: TelemetryWindow) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    eval_x = np.load(DATA)["eval_x"]
    loop = InferenceLoop(DirectorySource(inbox), window)
    loop.start()
    try:
        loop.swap(load(), active(1))
        time.sleep(0.1)
        assert loop.health.inferences == 0                   # nothing dropped yet

        drop(inbox, "a.npy", eval_x[:3])                     # a batch of three
        drop(inbox, "b.npy", eval_x[3])                      # one sample, no batch axis
        wait_until(lambda: loop.health.inferences == 4, what="4 inferences")
        wait_until(lambda: names(inbox) == ["a.done", "b.done"], what="a, b done")

        (inbox / "c.npy").write_bytes(b"not an npy file")
        drop(inbox, "d.npy", eval_x[4:6])
        wait_until(lambda: loop.health.inferences == 6, what="6 inferences")
        assert names(inbox) == ["a.done", "b.done", "c.bad", "d.done"]
        assert loop.is_alive() and loop.health.errors == 0
    finally:
        loop.stop()
        loop.join(timeout=10)
    batch = close(window)
    assert (batch.inferences, batch.labelled, batch.accuracy) == (6, 0, None)


def test_drop_files_of_mixed_shapes_do_not_stop_the_loop(tmp_path: Path,
                                                         window: TelemetryWindow) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    eval_x = np.load(DATA)["eval_x"]
    loop = InferenceLoop(DirectorySource(inbox, batch_size=2), window)
    loop.start()
    try:
        loop.swap(load(), active(1))
        drop(inbox, "a.npy", eval_x[:1])
        drop(inbox, "b.npy", np.zeros((1, 64), np.float32))  # cannot share a batch with a
        wait_until(lambda: names(inbox) == ["a.done", "b.done"], what="a, b taken")

        drop(inbox, "c.npy", eval_x[:4])
        wait_until(lambda: loop.health.inferences >= 4, what="inference after the bad pair")
        assert loop.is_alive()
    finally:
        loop.stop()
        loop.join(timeout=10)


def test_results_of_slow_batches_reach_the_health_within_a_fraction_of_a_second(
        window: TelemetryWindow) -> None:
    """The loop reads the clock every 64 fast batches; slow (or paced) ones must not wait for
    64 of them: the install watch and the telemetry windows read the health."""
    loop = InferenceLoop(ReplaySource(DATA, batch_size=1), window, pace_s=0.03)
    loop.swap(load(), active(1))
    started = time.monotonic()
    loop.start()
    try:
        wait_until(lambda: loop.health.inferences >= 5, timeout=5.0, what="5 results")
        took = time.monotonic() - started
    finally:
        loop.stop()
        loop.join(timeout=5)
    # 64 batches at 30 ms would be ~1.9 s; reading the clock by time spent keeps it short.
    assert took < 1.0, took
