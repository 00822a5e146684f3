"""The record written beside every variant file: the manifest's fields plus how it was measured.

Until the fleet database holds them, a folder of variants with their records is the registry.
A record is written after its file, so a record always describes a complete file.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import msgspec

from controller.variants.measure import Measurement
from edgefleet.contract import BuildMetrics, FileFormat, RuntimeRequirement, VariantKind

RECORD_SUFFIX = ".record.json"


class RecordError(ValueError):
    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


class VariantRecord(msgspec.Struct, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 1
    v: int = 1
    # The fields a manifest is issued from (contract.Manifest uses the same names).
    artifact_id: str
    model_name: str
    model_version: int
    variant_kind: VariantKind
    file_format: FileFormat
    runtime: RuntimeRequirement
    sha256: str
    size_bytes: int
    metrics: BuildMetrics
    # Where it came from and how it was measured.
    file: str
    source_sha256: str
    built_at: float
    measurement: Measurement
    notes: tuple[str, ...] = ()
    log: str = ""


def record_path(directory: Path, file: str) -> Path:
    return directory / f"{file}{RECORD_SUFFIX}"


def encode_record(record: VariantRecord) -> bytes:
    return msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n"


def load_records(directory: Path) -> list[VariantRecord]:
    """Every record in a variants folder, checked against the file it describes."""
    if not directory.is_dir():
        raise RecordError(directory, "not a directory")
    records = []
    for path in sorted(directory.glob(f"*{RECORD_SUFFIX}")):
        try:
            record = msgspec.json.decode(path.read_bytes(), type=VariantRecord)
        except (msgspec.DecodeError, OSError) as exc:
            raise RecordError(path, f"unreadable record: {exc}") from None
        artifact = directory / record.file
        if not artifact.is_file():
            raise RecordError(path, f"describes {record.file}, which is missing")
        if artifact.stat().st_size != record.size_bytes:
            raise RecordError(path, f"{record.file} is {artifact.stat().st_size} bytes, the "
                                    f"record says {record.size_bytes}")
        records.append(record)
    return records
