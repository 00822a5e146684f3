"""Variant selection: table-driven per profile, honest fallbacks, and properties that must hold
for any input (never a variant that breaks a hard constraint; deterministic)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract import BuildMetrics, Runtime, RuntimeFact, RuntimeRequirement, VariantKind
from edgefleet.contract.manifest import CPU_TARGETS
from edgefleet.hardware import load_profiles
from edgefleet.selection import Constraints, VariantCandidate, select_variant

PROFILES = load_profiles()
K = VariantKind
TRT, CUDA, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def variant(kind: VariantKind, accuracy: float, size: int, runtime: Runtime,
            targets: tuple[str, ...], cpu_fallback: bool = True) -> VariantCandidate:
    return VariantCandidate(
        variant_id=f"digits-v2-{kind.value}", kind=kind,
        runtime=RuntimeRequirement(runtime=runtime, targets=targets, cpu_fallback=cpu_fallback),
        size_bytes=size, metrics=BuildMetrics(accuracy=accuracy))


# What the variant pipeline builds for one model (accuracies as measured on load_digits).
VARIANTS = (
    variant(K.ONNX_FP32, 0.975, 400_000, Runtime.ONNXRUNTIME, (CUDA, CPU_EP)),
    variant(K.ONNX_FP16, 0.975, 200_000, Runtime.ONNXRUNTIME, (TRT, CUDA), cpu_fallback=False),
    variant(K.ONNX_INT8, 0.970, 110_000, Runtime.ONNXRUNTIME, (CPU_EP,)),
    variant(K.ONNX_PRUNED_INT8, 0.965, 60_000, Runtime.ONNXRUNTIME, (CPU_EP,)),
    variant(K.TFLITE_INT8, 0.968, 100_000, Runtime.LITERT, ("edgetpu", "cpu")),
)

ORT_CPU = RuntimeFact(name="onnxruntime", available=True, targets=(CPU_EP,))
ORT_GPU = RuntimeFact(name="onnxruntime", available=True, targets=(TRT, CUDA, CPU_EP))
LITERT_CPU = RuntimeFact(name="litert", available=True, targets=("cpu",),
                         missing=("edgetpu: unavailable: libedgetpu.so.1 not found",))
LITERT_TPU = RuntimeFact(name="litert", available=True, targets=("edgetpu", "cpu"))
NO_LITERT = RuntimeFact(name="litert", available=False, detail="No module named 'ai_edge_litert'")


@pytest.mark.parametrize(("profile", "runtimes", "kind", "target", "fallback"), [
    ("coral-usb-rpi4", (ORT_CPU, LITERT_TPU), K.TFLITE_INT8, "edgetpu", False),
    ("coral-pcie", (ORT_CPU, LITERT_TPU), K.TFLITE_INT8, "edgetpu", False),
    ("coral-devboard", (ORT_CPU, LITERT_TPU), K.TFLITE_INT8, "edgetpu", False),
    ("coral-usb-rpi4", (ORT_CPU, LITERT_CPU), K.ONNX_INT8, CPU_EP, False),
    ("coral-devboard", (LITERT_CPU,), K.TFLITE_INT8, "cpu", True),
    ("jetson-orin-nano", (ORT_GPU,), K.ONNX_FP16, TRT, False),
    ("jetson-nano", (ORT_GPU, LITERT_CPU), K.ONNX_FP16, TRT, False),
    # A Jetson whose CUDA provider does not load gets the variant built for CPUs.
    ("jetson-orin-nano", (ORT_CPU,), K.ONNX_INT8, CPU_EP, False),
    ("rpi4", (ORT_CPU, LITERT_CPU), K.ONNX_PRUNED_INT8, CPU_EP, False),
    ("rpi5", (ORT_CPU, LITERT_CPU), K.ONNX_PRUNED_INT8, CPU_EP, False),
    ("rpi4", (LITERT_CPU,), K.TFLITE_INT8, "cpu", False),
    ("x86-64", (ORT_CPU, LITERT_CPU), K.ONNX_INT8, CPU_EP, False),
])
def test_each_profile_gets_the_variant_that_fits(profile: str, runtimes: tuple[RuntimeFact, ...],
                                                 kind: VariantKind, target: str,
                                                 fallback: bool) -> None:
    selection = select_variant(PROFILES[profile], runtimes, VARIANTS)
    assert selection.chosen is not None and selection.chosen.placement is not None
    assert selection.chosen.variant.kind is kind
    assert selection.chosen.placement.target == target
    assert selection.chosen.placement.fallback is fallback
    considered = (selection.chosen, *selection.alternatives, *selection.rejected)
    assert sorted(c.variant.variant_id for c in considered) == sorted(
        v.variant_id for v in VARIANTS)


def test_a_coral_without_its_delegate_says_why_it_did_not_get_the_edge_tpu_model() -> None:
    selection = select_variant(PROFILES["coral-usb-rpi4"], (ORT_CPU, LITERT_CPU), VARIANTS)
    text = " ".join(selection.reasons)
    assert "preferred kind tflite-int8 not chosen" in text
    assert "libedgetpu.so.1 not found" in text


def test_a_coral_with_only_litert_runs_the_tflite_on_the_cpu_and_says_so() -> None:
    selection = select_variant(PROFILES["coral-devboard"], (LITERT_CPU,), VARIANTS)
    assert selection.chosen is not None and selection.chosen.placement is not None
    assert selection.chosen.placement.note == "edgetpu: unavailable: libedgetpu.so.1 not found"
    assert "fallback" in selection.chosen.reason


def test_a_jetson_without_cuda_and_without_cpu_variants_runs_fp32_on_the_cpu_as_fallback() -> None:
    fp = [v for v in VARIANTS if v.kind in (K.ONNX_FP32, K.ONNX_FP16)]
    selection = select_variant(PROFILES["jetson-orin-nano"], (ORT_CPU,), fp)
    assert selection.chosen is not None and selection.chosen.placement is not None
    assert selection.chosen.variant.kind is K.ONNX_FP32
    assert selection.chosen.placement.fallback
    fp16 = selection.rejected[0]
    assert fp16.variant.kind is K.ONNX_FP16 and "CPU fallback is not allowed" in fp16.reason


def test_an_accuracy_floor_moves_the_choice_to_the_next_preference() -> None:
    selection = select_variant(PROFILES["rpi4"], (ORT_CPU,), VARIANTS,
                               Constraints(min_accuracy=0.968))
    assert selection.chosen is not None and selection.chosen.variant.kind is K.ONNX_INT8
    pruned = [r for r in selection.rejected if r.variant.kind is K.ONNX_PRUNED_INT8]
    assert pruned and "below floor" in pruned[0].reason


def test_size_and_memory_limits_reject_with_reasons() -> None:
    selection = select_variant(PROFILES["x86-64"], (ORT_CPU,), VARIANTS,
                               Constraints(max_size_bytes=100_000))
    assert selection.chosen is not None and selection.chosen.variant.kind is K.ONNX_PRUNED_INT8
    reasons = {r.variant.kind: r.reason for r in selection.rejected}
    assert "above limit" in reasons[K.ONNX_INT8]
    tight = select_variant(PROFILES["x86-64"], (ORT_CPU,), VARIANTS,
                           Constraints(max_memory_mb=0.05))
    assert tight.chosen is None
    assert all("memory" in r.reason or "does not run" in r.reason for r in tight.rejected)


def test_no_fitting_variant_returns_none_with_every_rejection() -> None:
    selection = select_variant(PROFILES["rpi4"], (NO_LITERT,), VARIANTS)
    assert selection.chosen is None
    assert len(selection.rejected) == len(VARIANTS)
    assert "no variant fits rpi4" in selection.reasons[0]
    tflite = [r for r in selection.rejected if r.variant.kind is K.TFLITE_INT8]
    assert "No module named 'ai_edge_litert'" in tflite[0].reason


def test_cpu_fallback_can_be_forbidden() -> None:
    selection = select_variant(PROFILES["coral-devboard"], (LITERT_CPU,), VARIANTS,
                               Constraints(allow_cpu_fallback=False))
    assert selection.chosen is None
    assert "CPU fallback is not allowed" in " ".join(r.reason for r in selection.rejected)


# --- properties --------------------------------------------------------------------------------

TARGETS = {Runtime.ONNXRUNTIME: [TRT, CUDA, CPU_EP], Runtime.LITERT: ["edgetpu", "cpu"]}


@st.composite
def candidates(draw: st.DrawFn, index: int) -> VariantCandidate:
    runtime = draw(st.sampled_from(list(Runtime)))
    targets = tuple(draw(st.lists(st.sampled_from(TARGETS[runtime]), unique=True, max_size=3)))
    return VariantCandidate(
        variant_id=f"v{index}", kind=draw(st.sampled_from(list(VariantKind))),
        runtime=RuntimeRequirement(runtime=runtime, targets=targets,
                                   cpu_fallback=draw(st.booleans())),
        size_bytes=draw(st.integers(1, 2**31)),
        metrics=BuildMetrics(accuracy=draw(st.floats(0, 1))),
        peak_memory_mb=draw(st.none() | st.floats(0.1, 8192)))


variant_sets = st.integers(0, 7).flatmap(
    lambda n: st.tuples(*[candidates(i) for i in range(n)]))
runtime_facts = st.lists(st.builds(
    RuntimeFact, name=st.sampled_from(["onnxruntime", "litert"]), available=st.booleans(),
    targets=st.lists(st.sampled_from([TRT, CUDA, CPU_EP, "edgetpu", "cpu"]), unique=True,
                     max_size=4).map(tuple)), max_size=3).map(tuple)
constraint_sets = st.builds(Constraints, min_accuracy=st.none() | st.floats(0, 1),
                            max_size_bytes=st.none() | st.integers(1, 2**31),
                            max_memory_mb=st.none() | st.floats(0.1, 8192),
                            allow_cpu_fallback=st.booleans())


@settings(max_examples=400, deadline=None)
@given(profile=st.sampled_from(sorted(PROFILES)), runtimes=runtime_facts, variants=variant_sets,
       constraints=constraint_sets, order=st.randoms())
def test_never_a_variant_that_breaks_a_hard_constraint_and_always_deterministic(
        profile: str, runtimes: tuple[RuntimeFact, ...], variants: tuple[VariantCandidate, ...],
        constraints: Constraints, order: object) -> None:
    hw = PROFILES[profile]
    selection = select_variant(hw, runtimes, variants, constraints)
    shuffled = list(variants)
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    assert select_variant(hw, runtimes, shuffled, constraints) == selection
    considered = [selection.chosen] if selection.chosen else []
    considered += [*selection.alternatives, *selection.rejected]
    assert sorted(c.variant.variant_id for c in considered) == sorted(
        v.variant_id for v in variants)
    for pick in ([selection.chosen] if selection.chosen else []) + list(selection.alternatives):
        v, placement = pick.variant, pick.placement
        assert placement is not None
        assert v.kind in hw.prefers
        assert constraints.min_accuracy is None or v.metrics.accuracy >= constraints.min_accuracy
        assert v.size_bytes <= hw.limits.max_model_bytes
        assert constraints.max_size_bytes is None or v.size_bytes <= constraints.max_size_bytes
        assert v.memory_mb <= hw.limits.memory_budget_mb
        assert constraints.max_memory_mb is None or v.memory_mb <= constraints.max_memory_mb
        loaded = [f for f in runtimes if f.name == placement.runtime.value and f.available]
        assert any(placement.target in f.targets for f in loaded)
        assert placement.target in (hw.runtime_targets(placement.runtime) or ())
        if placement.fallback:
            assert placement.target in CPU_TARGETS
            assert v.runtime.cpu_fallback and constraints.allow_cpu_fallback
    if selection.chosen and selection.alternatives:
        assert (selection.chosen.placement is not None)
        best = selection.chosen
        for alt in selection.alternatives:
            assert alt.placement is not None and best.placement is not None
            assert (best.placement.fallback, hw.prefers.index(best.variant.kind)) <= (
                alt.placement.fallback, hw.prefers.index(alt.variant.kind))

