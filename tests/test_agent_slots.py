"""agent.slots on a real temp directory: staging goes to the slot that is not current, activation
and rollback move the pointers, a damaged slot is detected, and the pointers file is only ever
replaced whole."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import msgspec
import pytest

from agent.slots import InstalledModel, ModelStore, Pointers, StoreError, prepare_download_dir
from edgefleet.contract import (
    BuildMetrics,
    FileFormat,
    Manifest,
    Runtime,
    RuntimeRequirement,
    VariantKind,
)


def manifest_for(data: bytes, version: int, *, tflite: bool = False) -> Manifest:
    sha = hashlib.sha256(data).hexdigest()
    kind = VariantKind.TFLITE_INT8 if tflite else VariantKind.ONNX_FP32
    return Manifest(
        artifact_id=f"digits-v{version}-{sha[:8]}", model_name="digits", model_version=version,
        variant_kind=kind, file_format=FileFormat.TFLITE if tflite else FileFormat.ONNX,
        runtime=RuntimeRequirement(runtime=Runtime.LITERT if tflite else Runtime.ONNXRUNTIME),
        sha256=sha, size_bytes=len(data), chunk_size=1024, metrics=BuildMetrics(accuracy=0.98),
        issued_at=0.0, expires_at=1e12, device_id="pi-0001")


def stage(store: ModelStore, tmp_path: Path, version: int, *,
          tflite: bool = False) -> InstalledModel:
    """Stages a download of a model file whose content is unique to `version`."""
    data = f"model v{version} ".encode() * 100
    downloads = prepare_download_dir(tmp_path / "state")
    downloaded = downloads / f"v{version}.part"
    downloaded.write_bytes(data)
    manifest = manifest_for(data, version, tflite=tflite)
    return store.stage(downloaded, msgspec.json.encode(manifest), manifest)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "state")


def test_a_fresh_store_has_no_pointers_and_stages_into_slot_a(store: ModelStore) -> None:
    assert store.pointers() == Pointers()
    assert store.inactive_slot() == "a"


def test_staging_moves_the_download_into_the_inactive_slot(store: ModelStore,
                                                            tmp_path: Path) -> None:
    v1 = stage(store, tmp_path, 1)

    assert (v1.slot, v1.file, v1.model_version) == ("a", "model.onnx", 1)
    assert store.path(v1) == store.root / "a" / "model.onnx"
    assert store.intact(v1)
    assert not (tmp_path / "state/downloads/v1.part").exists()
    assert store.pointers() == Pointers()          # staged is not active

    store.activate(v1)
    v2 = stage(store, tmp_path, 2, tflite=True)

    assert (v2.slot, v2.file) == ("b", "model.tflite")
    assert store.intact(v1) and store.intact(v2)   # the current model is untouched


def test_activate_makes_the_new_model_current_and_the_old_one_previous(
        store: ModelStore, tmp_path: Path) -> None:
    v1 = stage(store, tmp_path, 1)
    assert store.activate(v1) == Pointers(current=v1, previous=None)
    v2 = stage(store, tmp_path, 2)

    pointers = store.activate(v2)

    assert pointers == Pointers(current=v2, previous=v1)
    assert ModelStore(tmp_path / "state").pointers() == pointers   # on disk, not only in memory
    assert store.inactive_slot() == "a"


def test_roll_back_makes_the_previous_model_current_again(store: ModelStore,
                                                          tmp_path: Path) -> None:
    v1 = stage(store, tmp_path, 1)
    store.activate(v1)
    v2 = stage(store, tmp_path, 2)
    store.activate(v2)

    pointers = store.roll_back(v2)

    assert pointers == Pointers(current=v1, previous=None)
    assert ModelStore(tmp_path / "state").pointers() == pointers
    assert store.intact(v1)


def test_roll_back_of_a_model_no_longer_current_changes_nothing(store: ModelStore,
                                                                tmp_path: Path) -> None:
    v1 = stage(store, tmp_path, 1)
    store.activate(v1)
    v2 = stage(store, tmp_path, 2)
    store.activate(v2)
    store.roll_back(v2)
    stat = (store.root / "pointers.json").stat()

    # A restart in ROLLING_BACK runs the rollback again with the same failed model.
    again = store.roll_back(v2)

    assert again == Pointers(current=v1, previous=None)   # v1 is not rolled back to nothing
    assert store.pointers() == again
    again_stat = (store.root / "pointers.json").stat()
    assert (again_stat.st_ino, again_stat.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_roll_back_of_a_model_that_was_never_activated_changes_nothing(
        store: ModelStore, tmp_path: Path) -> None:
    v1 = stage(store, tmp_path, 1)
    store.activate(v1)
    v2 = stage(store, tmp_path, 2)   # a crash before activation: the pointer never named it

    assert store.roll_back(v2) == Pointers(current=v1, previous=None)


def test_staging_into_the_previous_models_slot_first_drops_its_pointer(
        store: ModelStore, tmp_path: Path) -> None:
    v1 = stage(store, tmp_path, 1)
    store.activate(v1)
    v2 = stage(store, tmp_path, 2)
    store.activate(v2)                                  # current v2 in b, previous v1 in a

    v3 = stage(store, tmp_path, 3)

    assert v3.slot == "a"
    assert store.pointers() == Pointers(current=v2, previous=None)
    assert not store.intact(v1)                         # its file is gone; nothing names it


def test_a_staging_that_fails_half_way_leaves_no_pointer_to_the_emptied_slot(
        store: ModelStore, tmp_path: Path) -> None:
    v1 = stage(store, tmp_path, 1)
    store.activate(v1)
    v2 = stage(store, tmp_path, 2)
    store.activate(v2)
    manifest = manifest_for(b"v3", 3)

    with pytest.raises(FileNotFoundError):               # the download vanished
        store.stage(tmp_path / "state/downloads/missing.part", b"{}", manifest)

    assert store.pointers() == Pointers(current=v2, previous=None)
    assert list((store.root / "a").iterdir()) == []
    assert store.intact(v2)


@pytest.mark.parametrize("damage", ["truncated", "one byte changed", "deleted",
                                    "replaced by a directory"])
def test_intact_detects_a_damaged_slot(store: ModelStore, tmp_path: Path, damage: str) -> None:
    v1 = stage(store, tmp_path, 1)
    path = store.path(v1)
    assert store.intact(v1)
    data = path.read_bytes()

    if damage == "truncated":
        path.write_bytes(data[:-1])
    elif damage == "one byte changed":
        path.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "deleted":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()

    assert not store.intact(v1)


def test_the_pointers_file_is_replaced_whole_and_leaves_no_temp_file(
        store: ModelStore, tmp_path: Path) -> None:
    v1 = stage(store, tmp_path, 1)
    v2 = stage(store, tmp_path, 2)  # both slots' models, re-activated in turn below
    seen: list[Pointers] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def read_continuously() -> None:
        while not done.is_set():
            try:
                seen.append(store.pointers())
            except BaseException as exc:   # a torn file would decode badly here
                failures.append(exc)
                return

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        deadline = time.monotonic() + 1.0
        writes = 0
        while time.monotonic() < deadline or writes < 50:
            store.activate(v1 if writes % 2 else v2)
            writes += 1
    finally:
        done.set()
        reader.join()

    assert failures == []
    assert len(seen) > 0
    assert all(p.current in (v1, v2) or p == Pointers() for p in seen)
    assert sorted(p.name for p in store.root.iterdir()) == ["a", "b", "pointers.json"]


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"current": 5}',
                                     b'{"current": {"slot": "a"}}', b"\xff\xfe\x00"])
def test_a_corrupt_pointers_file_raises_store_error_naming_it(store: ModelStore,
                                                              content: bytes) -> None:
    pointers_file = store.root / "pointers.json"
    pointers_file.write_bytes(content)

    with pytest.raises(StoreError, match=str(pointers_file)):
        store.pointers()
    with pytest.raises(StoreError):
        store.inactive_slot()
