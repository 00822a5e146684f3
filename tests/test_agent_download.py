"""agent.download on a real temp directory: chunks in any order make the exact file, refused
chunks change nothing, a download resumes after a crash with only what is missing, and no flood
of chunks grows the file past the manifest's size."""

from __future__ import annotations

import hashlib
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.download import Download, DownloadError
from edgefleet.contract import (
    ArtifactChunk,
    BuildMetrics,
    FileFormat,
    Manifest,
    Runtime,
    RuntimeRequirement,
    VariantKind,
)

CHUNK = 64


def artifact(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def manifest_for(data: bytes, *, chunk_size: int = CHUNK, sha256: str | None = None) -> Manifest:
    sha = sha256 or hashlib.sha256(data).hexdigest()
    return Manifest(
        artifact_id=f"digits-v1-{sha[:8]}", model_name="digits", model_version=1,
        variant_kind=VariantKind.ONNX_FP32, file_format=FileFormat.ONNX,
        runtime=RuntimeRequirement(runtime=Runtime.ONNXRUNTIME), sha256=sha,
        size_bytes=len(data), chunk_size=chunk_size, metrics=BuildMetrics(accuracy=0.98),
        issued_at=0.0, expires_at=1e12, device_id="pi-0001")


def chunks_of(data: bytes, manifest: Manifest) -> list[ArtifactChunk]:
    size = manifest.chunk_size
    return [ArtifactChunk(artifact_id=manifest.artifact_id, index=i, total=manifest.chunk_count,
                          data=data[i * size:(i + 1) * size])
            for i in range(manifest.chunk_count)]


def test_a_file_of_one_short_last_chunk_assembles_exactly(tmp_path: Path) -> None:
    data = artifact(5 * CHUNK + 17)
    manifest = manifest_for(data)
    download = Download(tmp_path, manifest)
    assert (download.total, download.missing(100)) == (6, [0, 1, 2, 3, 4, 5])

    for chunk in chunks_of(data, manifest):
        assert download.accept(chunk) is None
    path = download.finish()

    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]   # the bitmap is gone


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=0, max_value=12 * CHUNK), data=st.data())
def test_chunks_in_any_order_with_duplicates_assemble_the_exact_file(
        size: int, data: st.DataObject) -> None:
    content = artifact(size, seed=size)
    manifest = manifest_for(content)
    chunks = chunks_of(content, manifest)
    order = data.draw(st.permutations(range(len(chunks))))
    repeats = data.draw(st.lists(st.sampled_from(range(len(chunks))), max_size=10))
    with tempfile.TemporaryDirectory() as directory:
        download = Download(Path(directory), manifest)

        for index in [*order, *repeats]:
            assert download.accept(chunks[index]) is None
            download.checkpoint()

        assert download.complete
        assert download.finish().read_bytes() == content


def test_a_duplicate_chunk_is_taken_without_writing_again(tmp_path: Path) -> None:
    data = artifact(3 * CHUNK)
    manifest = manifest_for(data)
    download = Download(tmp_path, manifest)
    first = chunks_of(data, manifest)[1]
    assert download.accept(first) is None

    # A late copy of an already written chunk (say, from a re-request) changes nothing.
    assert download.accept(ArtifactChunk(artifact_id=first.artifact_id, index=1, total=3,
                                         data=bytes(CHUNK))) is None

    assert download.received == 1
    assert download.part.read_bytes()[CHUNK:2 * CHUNK] == data[CHUNK:2 * CHUNK]
    download.close()


REFUSED = [
    pytest.param(dict(artifact_id="other-artifact"), "another artifact", id="other-artifact"),
    pytest.param(dict(index=4), "outside", id="index-past-the-end"),
    pytest.param(dict(index=-1), "outside", id="negative-index"),
    pytest.param(dict(total=5), "outside", id="wrong-total"),
    pytest.param(dict(data=bytes(CHUNK - 1)), "expected 64", id="short-chunk"),
    pytest.param(dict(data=bytes(CHUNK + 1)), "expected 64", id="long-chunk"),
    pytest.param(dict(index=3, data=bytes(CHUNK)), "expected 10", id="full-size-last-chunk"),
    pytest.param(dict(data=b""), "expected 64", id="empty-chunk"),
]


@pytest.mark.parametrize(("change", "reason"), REFUSED)
def test_a_refused_chunk_leaves_the_file_untouched_and_says_why(
        tmp_path: Path, change: dict[str, object], reason: str) -> None:
    data = artifact(3 * CHUNK + 10)
    manifest = manifest_for(data)
    download = Download(tmp_path, manifest)
    good = chunks_of(data, manifest)
    download.accept(good[0])
    before = download.part.read_bytes()
    fields: dict[str, object] = dict(artifact_id=manifest.artifact_id, index=1, total=4,
                                     data=b"\xff" * CHUNK)

    problem = download.accept(ArtifactChunk(**{**fields, **change}))  # type: ignore[arg-type]

    assert problem is not None and reason in problem
    assert download.part.read_bytes() == before
    assert (download.received, download.missing(10)) == (1, [1, 2, 3])
    download.close()


def test_a_download_resumes_after_a_crash_asking_only_for_missing_chunks(tmp_path: Path) -> None:
    data = artifact(10 * CHUNK)
    manifest = manifest_for(data)
    chunks = chunks_of(data, manifest)
    first = Download(tmp_path, manifest)
    for index in (0, 2, 3, 7):
        first.accept(chunks[index])
    first.checkpoint()
    first.accept(chunks[9])          # written, but the crash comes before its checkpoint
    del first                        # the process dies: no close()

    resumed = Download(tmp_path, manifest)

    assert resumed.received == 4
    assert resumed.missing(100) == [1, 4, 5, 6, 8, 9]
    assert resumed.missing(3) == [1, 4, 5]
    for index in resumed.missing(100):
        resumed.accept(chunks[index])
    assert resumed.finish().read_bytes() == data


def test_a_bitmap_without_its_part_file_is_not_trusted(tmp_path: Path) -> None:
    data = artifact(4 * CHUNK)
    manifest = manifest_for(data)
    chunks = chunks_of(data, manifest)
    first = Download(tmp_path, manifest)
    first.accept(chunks[0])
    first.close()
    first.part.unlink()              # the data is gone; the bitmap still claims chunk 0

    again = Download(tmp_path, manifest)

    assert again.missing(10) == [0, 1, 2, 3]
    again.close()


def test_finish_with_chunks_missing_raises_and_keeps_what_arrived(tmp_path: Path) -> None:
    data = artifact(3 * CHUNK)
    manifest = manifest_for(data)
    download = Download(tmp_path, manifest)
    download.accept(chunks_of(data, manifest)[0])

    with pytest.raises(DownloadError, match="2 chunks missing"):
        download.finish()
    download.close()

    assert Download(tmp_path, manifest).missing(10) == [1, 2]


def test_finish_with_a_wrong_sha256_raises_and_removes_the_part_file(tmp_path: Path) -> None:
    data = artifact(3 * CHUNK)
    manifest = manifest_for(data, sha256=hashlib.sha256(b"something else").hexdigest())
    download = Download(tmp_path, manifest)
    for chunk in chunks_of(data, manifest):
        download.accept(chunk)

    with pytest.raises(DownloadError, match="does not match"):
        download.finish()

    assert not download.part.exists()
    assert list(tmp_path.iterdir()) == []
    assert Download(tmp_path, manifest).missing(10) == [0, 1, 2]   # a retry starts over


def test_a_flood_of_chunks_never_grows_the_part_file_beyond_the_manifest(tmp_path: Path) -> None:
    data = artifact(8 * CHUNK + 5)
    manifest = manifest_for(data)
    good = chunks_of(data, manifest)
    download = Download(tmp_path, manifest)
    rng = random.Random(7)

    for n in range(20_000):
        kind = rng.randrange(4)
        if kind == 0:
            chunk = good[rng.randrange(len(good))]
        elif kind == 1:                 # far past the end, or huge
            chunk = ArtifactChunk(artifact_id=manifest.artifact_id,
                                  index=rng.randrange(9, 1 << 40), total=manifest.chunk_count,
                                  data=bytes(CHUNK))
        elif kind == 2:
            chunk = ArtifactChunk(artifact_id=manifest.artifact_id, index=rng.randrange(9),
                                  total=manifest.chunk_count,
                                  data=bytes(rng.choice([CHUNK * 2, CHUNK * 100, 1])))
        else:                           # claims a bigger file
            chunk = ArtifactChunk(artifact_id=manifest.artifact_id, index=100, total=1000,
                                  data=bytes(CHUNK))
        download.accept(chunk)
        if n % 1000 == 0:
            download.checkpoint()
            assert download.part.stat().st_size == manifest.size_bytes

    assert download.part.stat().st_size == manifest.size_bytes
    assert download.finish().read_bytes() == data
