"""The artifact manifest: what a device needs to fetch, verify and run one model variant.

A manifest is issued per device (``device_id``) and signed by the fleet's ed25519 key, so a
device accepts only artifacts meant for it, from its fleet, before they expire. Signing and
verification live in contract.signing, the one implementation both sides use.
"""

from __future__ import annotations

import enum

import msgspec

from edgefleet.contract.messages import FileFormat, VariantKind, WireMessage


class Runtime(enum.Enum):
    ONNXRUNTIME = "onnxruntime"
    LITERT = "litert"          # ai-edge-litert, or tflite-runtime on older devices


# The plain-CPU target of each runtime; any other target is an accelerator.
CPU_TARGETS = frozenset({"cpu", "CPUExecutionProvider"})


class RuntimeRequirement(msgspec.Struct, frozen=True, kw_only=True):
    """Where the artifact may run: runtime, then targets (providers or delegates) best first.

    ``cpu_fallback`` says whether the agent may run it on the plain CPU when none of the targets
    loads (an INT8 TFLite runs on the CPU through LiteRT, slower but correct).
    """

    runtime: Runtime
    targets: tuple[str, ...] = ()
    cpu_fallback: bool = True


class BuildMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """What the variant pipeline measured when it built the artifact."""

    accuracy: float                         # top-1 on the held-out split
    agreement: float | None = None          # top-1 agreement with the FP32 source
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    measured_on: str = ""                   # runtime/target the numbers come from
    params: int | None = None
    macs: int | None = None


class Manifest(WireMessage, frozen=True, kw_only=True, tag="manifest"):
    artifact_id: str
    model_name: str
    model_version: int                      # monotonic per model; a device never goes back
    variant_kind: VariantKind
    file_format: FileFormat
    runtime: RuntimeRequirement
    sha256: str                             # of the whole artifact file, lower-case hex
    size_bytes: int
    chunk_size: int
    metrics: BuildMetrics
    issued_at: float
    expires_at: float
    device_id: str
    key_id: str = ""
    signature: bytes = b""                  # ed25519 over canonical_bytes(manifest)

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size_bytes // self.chunk_size))
