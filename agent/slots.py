"""Model slots on the device: two slots (A/B) and one pointers file naming current and previous.

A new model is staged into the slot that is not current, and activated by rewriting the
pointers file atomically, so at every instant the device has exactly one current model, old or
new, whose file is complete. The previous model stays in its slot for rollback. Staging into a
slot first drops the pointer to whatever the slot held, so a pointer never names a file that is
being overwritten.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import msgspec

from agent.durable import fsync_directory, move_atomically, write_atomically
from edgefleet.contract import ActiveModel, Manifest

SLOTS = ("a", "b")


class StoreError(RuntimeError):
    pass


class InstalledModel(msgspec.Struct, frozen=True, kw_only=True):
    slot: str
    file: str
    manifest: bytes                 # the signed manifest as received, to re-verify at start-up
    artifact_id: str
    model_name: str
    model_version: int
    sha256: str

    def active(self, manifest: Manifest) -> ActiveModel:
        return ActiveModel(model_name=self.model_name, model_version=self.model_version,
                           variant_kind=manifest.variant_kind, artifact_id=self.artifact_id)


class Pointers(msgspec.Struct, frozen=True, kw_only=True):
    current: InstalledModel | None = None
    previous: InstalledModel | None = None


class ModelStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "models"
        for slot in SLOTS:
            (self.root / slot).mkdir(parents=True, exist_ok=True)
        self._pointers_file = self.root / "pointers.json"

    def pointers(self) -> Pointers:
        try:
            return msgspec.json.decode(self._pointers_file.read_bytes(), type=Pointers)
        except FileNotFoundError:
            return Pointers()
        except msgspec.DecodeError as exc:
            raise StoreError(f"{self._pointers_file}: unreadable ({exc})") from None

    def path(self, model: InstalledModel) -> Path:
        return self.root / model.slot / model.file

    def inactive_slot(self) -> str:
        current = self.pointers().current
        return "b" if current is not None and current.slot == "a" else "a"

    def stage(self, downloaded: Path, manifest_raw: bytes, manifest: Manifest) -> InstalledModel:
        """Moves a verified download into the inactive slot; returns what it installed."""
        slot = self.inactive_slot()
        pointers = self.pointers()
        if pointers.previous is not None and pointers.previous.slot == slot:
            self._write(Pointers(current=pointers.current, previous=None))
        directory = self.root / slot
        for stale in directory.iterdir():
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        suffix = ".tflite" if manifest.file_format.value == "tflite" else ".onnx"
        target = directory / f"model{suffix}"
        move_atomically(downloaded, target)
        return InstalledModel(slot=slot, file=target.name, manifest=manifest_raw,
                              artifact_id=manifest.artifact_id, model_name=manifest.model_name,
                              model_version=manifest.model_version, sha256=manifest.sha256)

    def activate(self, model: InstalledModel) -> Pointers:
        pointers = self.pointers()
        new = Pointers(current=model, previous=pointers.current)
        self._write(new)
        return new

    def roll_back(self, failed: InstalledModel | None = None) -> Pointers:
        """Makes the previous model current again. Idempotent: if `failed` is no longer
        current, the rollback already happened."""
        pointers = self.pointers()
        if failed is not None and (pointers.current is None
                                   or pointers.current.artifact_id != failed.artifact_id):
            return pointers
        new = Pointers(current=pointers.previous, previous=None)
        self._write(new)
        return new

    def intact(self, model: InstalledModel) -> bool:
        """Whether the slot still holds the exact file its pointer describes."""
        path = self.path(model)
        if not path.is_file():
            return False
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest() == model.sha256

    def _write(self, pointers: Pointers) -> None:
        write_atomically(self._pointers_file, msgspec.json.encode(pointers))


def prepare_download_dir(state_dir: Path) -> Path:
    directory = state_dir / "downloads"
    directory.mkdir(parents=True, exist_ok=True)
    fsync_directory(directory.parent)
    return directory

