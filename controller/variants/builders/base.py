"""What every builder takes and returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from controller.variants.source import EvalData, SourceModel
from edgefleet.contract import FileFormat, RuntimeRequirement, VariantKind


class BuildError(RuntimeError):
    """A builder could not make its variant; the message says why in one line."""


@dataclass(frozen=True)
class BuiltVariant:
    kind: VariantKind
    path: Path                        # the artifact, inside the work directory it was given
    file_format: FileFormat
    runtime: RuntimeRequirement       # where it may run, best target first
    notes: tuple[str, ...] = ()       # what an operator should know (e.g. "not compiled: ...")
    params: int | None = None
    macs: int | None = None
    log: str = ""                     # tool output worth keeping (the Edge TPU compiler's)
    # When the artifact needs hardware the build machine lacks (an Edge TPU-compiled model),
    # the file and runtime that stand in for it in measurement; the notes say so.
    measured_as: tuple[Path, RuntimeRequirement] | None = None


class Builder(Protocol):
    kind: VariantKind

    def __call__(self, source: SourceModel, data: EvalData, workdir: Path) -> BuiltVariant: ...
