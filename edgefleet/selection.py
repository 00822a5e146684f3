"""Variant selection: which of a model's variants a device should run, and why.

A pure function of the device's profile, the runtimes its agent reports, the model's measured
variants and the operator's constraints. It returns the choice with the runtime and target
(execution provider or delegate) it will run on, plus every other variant with the reason it
lost, so `edgefleet` can show an operator exactly why a device got what it got.

Ranking: variants that run where they were built to run (an INT8 TFLite on the Edge TPU) come
before fallbacks (the same file on the CPU); then the profile's order of preference; then
higher accuracy, smaller size, and the variant id, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgefleet.contract.manifest import CPU_TARGETS, BuildMetrics, Runtime, RuntimeRequirement
from edgefleet.contract.messages import RuntimeFact, VariantKind
from edgefleet.hardware.profile import HardwareProfile

# Without a measured figure a model needs about its weights twice in RAM (weights + arena).
MEMORY_PER_MODEL_BYTE = 2.0


@dataclass(frozen=True)
class VariantCandidate:
    """A built variant as selection sees it: what it is, where it may run, what it measured."""

    variant_id: str
    kind: VariantKind
    runtime: RuntimeRequirement
    size_bytes: int
    metrics: BuildMetrics
    peak_memory_mb: float | None = None

    @property
    def memory_mb(self) -> float:
        if self.peak_memory_mb is not None:
            return self.peak_memory_mb
        return self.size_bytes * MEMORY_PER_MODEL_BYTE / 2**20


@dataclass(frozen=True)
class Constraints:
    """Hard limits from the operator or the rollout; the profile adds its own."""

    min_accuracy: float | None = None
    max_size_bytes: int | None = None
    max_memory_mb: float | None = None
    allow_cpu_fallback: bool = True


@dataclass(frozen=True)
class Placement:
    """Where a variant would run on this device."""

    runtime: Runtime
    target: str
    fallback: bool          # True when it runs on the CPU instead of its intended accelerator
    note: str               # e.g. "edgetpu: unavailable: libedgetpu.so.1 not found"

    @property
    def label(self) -> str:
        return f"{self.runtime.value}/{self.target}"


@dataclass(frozen=True)
class Considered:
    variant: VariantCandidate
    placement: Placement | None
    reason: str             # why it was rejected, or why it ranked where it did


@dataclass(frozen=True)
class Selection:
    chosen: Considered | None
    reasons: tuple[str, ...]
    alternatives: tuple[Considered, ...]   # acceptable, ranked below the choice
    rejected: tuple[Considered, ...]       # broke a hard constraint or cannot run here


def select_variant(profile: HardwareProfile, runtimes: Sequence[RuntimeFact],
                   variants: Sequence[VariantCandidate],
                   constraints: Constraints = Constraints()) -> Selection:
    accepted: list[tuple[tuple[object, ...], Considered]] = []
    rejected: list[Considered] = []
    for variant in sorted(variants, key=lambda v: v.variant_id):
        problem = _hard_constraint_problem(profile, variant, constraints)
        placement = None if problem else _place(profile, runtimes, variant, constraints)
        if problem is None and placement is None:
            problem = _placement_problem(profile, runtimes, variant)
        if problem is not None or placement is None:
            rejected.append(Considered(variant, None, problem or "cannot run here"))
            continue
        rank = profile.prefers.index(variant.kind)
        key = (placement.fallback, rank, -variant.metrics.accuracy, variant.size_bytes,
               variant.variant_id)
        why = (f"preference {rank + 1} of {len(profile.prefers)} on {profile.name}, "
               f"runs on {placement.label}" + (f" (fallback: {placement.note})"
                                               if placement.fallback else ""))
        accepted.append((key, Considered(variant, placement, why)))

    accepted.sort(key=lambda item: item[0])
    if not accepted:
        return Selection(None, (f"no variant fits {profile.name}: "
                                f"{len(rejected)} rejected",), (), tuple(rejected))
    chosen = accepted[0][1]
    reasons = [f"chose {chosen.variant.variant_id} ({chosen.variant.kind.value}): {chosen.reason}"]
    top = profile.prefers[0]
    if chosen.variant.kind is not top:
        lost = [c for c in (*rejected, *(a for _, a in accepted[1:])) if c.variant.kind is top]
        why_not = "; ".join(f"{c.variant.variant_id}: {c.reason}" for c in lost)
        reasons.append(f"preferred kind {top.value} not chosen: "
                       + (why_not or "the model has no such variant"))
    return Selection(chosen, tuple(reasons), tuple(a for _, a in accepted[1:]), tuple(rejected))


def _hard_constraint_problem(profile: HardwareProfile, variant: VariantCandidate,
                             constraints: Constraints) -> str | None:
    if variant.kind is VariantKind.UNKNOWN:
        return "unknown variant kind"
    if variant.kind not in profile.prefers:
        return f"profile {profile.name} does not run {variant.kind.value}"
    if profile.runtime_targets(variant.runtime.runtime) is None:
        return f"profile {profile.name} has no {variant.runtime.runtime.value} runtime"
    floor = constraints.min_accuracy
    if floor is not None and variant.metrics.accuracy < floor:
        return f"accuracy {variant.metrics.accuracy:.4f} below floor {floor:.4f}"
    size_limit = min(profile.limits.max_model_bytes,
                     constraints.max_size_bytes or profile.limits.max_model_bytes)
    if variant.size_bytes > size_limit:
        return f"size {variant.size_bytes} B above limit {size_limit} B"
    memory_limit = min(float(profile.limits.memory_budget_mb),
                       constraints.max_memory_mb or float(profile.limits.memory_budget_mb))
    if variant.memory_mb > memory_limit:
        return f"memory {variant.memory_mb:.1f} MB above budget {memory_limit:.1f} MB"
    return None


def _runtime_fact(runtimes: Sequence[RuntimeFact], runtime: Runtime) -> RuntimeFact | None:
    for fact in runtimes:
        if fact.name == runtime.value and fact.available:
            return fact
    return None


def _place(profile: HardwareProfile, runtimes: Sequence[RuntimeFact],
           variant: VariantCandidate, constraints: Constraints) -> Placement | None:
    runtime = variant.runtime.runtime
    fact = _runtime_fact(runtimes, runtime)
    profile_targets = profile.runtime_targets(runtime) or ()
    wanted = [t for t in variant.runtime.targets if t in profile_targets] or list(profile_targets)
    if fact is None or not wanted:
        return None
    intended = wanted[0]
    for target in wanted:
        if target in fact.targets:
            fallback = target in CPU_TARGETS and intended not in CPU_TARGETS
            if fallback and not (variant.runtime.cpu_fallback and constraints.allow_cpu_fallback):
                continue
            note = _missing_note(fact, intended) if fallback else ""
            return Placement(runtime, target, fallback, note)
    return None


def _placement_problem(profile: HardwareProfile, runtimes: Sequence[RuntimeFact],
                       variant: VariantCandidate) -> str:
    runtime = variant.runtime.runtime
    fact = _runtime_fact(runtimes, runtime)
    if fact is None:
        details = [f.detail for f in runtimes if f.name == runtime.value and f.detail]
        return f"{runtime.value} not available on the device" + (
            f": {details[0]}" if details else "")
    wanted = [t for t in variant.runtime.targets
              if t in (profile.runtime_targets(runtime) or ())]
    missing = "; ".join(_missing_note(fact, t) for t in wanted) or "no target in common"
    return f"none of its targets loads ({missing}) and CPU fallback is not allowed"


def _missing_note(fact: RuntimeFact, target: str) -> str:
    for line in fact.missing:
        if line.startswith(f"{target}:"):
            return line
    return f"{target}: not loaded by {fact.name}"
