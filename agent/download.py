"""A resumable artifact download: chunks written in place, a bitmap of what has arrived.

Chunk data is written and fsynced before the bitmap that records it, so after a crash the bitmap
never claims a chunk the file does not hold; the download resumes with what is missing. Chunks
that were not asked for, belong to another artifact, or have the wrong size are refused, so a
flood of chunks cannot grow the file or memory beyond the manifest's size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.durable import write_atomically
from edgefleet.contract import ArtifactChunk, Manifest


class DownloadError(RuntimeError):
    pass


class Download:
    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.manifest = manifest
        self.part = directory / f"{manifest.artifact_id}.part"
        self._bitmap_file = directory / f"{manifest.artifact_id}.have"
        self.total = manifest.chunk_count
        self._have = bytearray(self.total)
        if self._bitmap_file.exists() and self.part.exists():
            saved = self._bitmap_file.read_bytes()
            if len(saved) == self.total:
                self._have = bytearray(saved)
        if not self.part.exists():
            with self.part.open("wb") as f:
                f.truncate(manifest.size_bytes)
        self._fd = os.open(self.part, os.O_WRONLY)
        self._dirty = False

    @property
    def received(self) -> int:
        return sum(self._have)

    @property
    def complete(self) -> bool:
        return all(self._have)

    def missing(self, limit: int) -> list[int]:
        out = []
        for index, have in enumerate(self._have):
            if not have:
                out.append(index)
                if len(out) == limit:
                    break
        return out

    def expected_size(self, index: int) -> int:
        if index == self.total - 1:
            return self.manifest.size_bytes - index * self.manifest.chunk_size
        return self.manifest.chunk_size

    def accept(self, chunk: ArtifactChunk) -> str | None:
        """Writes a chunk; returns why it was refused, or None when it was taken."""
        if chunk.artifact_id != self.manifest.artifact_id:
            return f"chunk of another artifact {chunk.artifact_id!r}"
        if chunk.total != self.total or not 0 <= chunk.index < self.total:
            return f"chunk {chunk.index}/{chunk.total} outside 0..{self.total - 1}"
        if len(chunk.data) != self.expected_size(chunk.index):
            return (f"chunk {chunk.index} has {len(chunk.data)} bytes, expected "
                    f"{self.expected_size(chunk.index)}")
        if self._have[chunk.index]:
            return None  # a duplicate after a re-request: already written
        os.pwrite(self._fd, chunk.data, chunk.index * self.manifest.chunk_size)
        self._have[chunk.index] = 1
        self._dirty = True
        return None

    def checkpoint(self) -> None:
        """Makes what was written durable, then records it in the bitmap."""
        if not self._dirty:
            return
        os.fsync(self._fd)
        write_atomically(self._bitmap_file, bytes(self._have))
        self._dirty = False

    def finish(self) -> Path:
        """Checks size and sha256 of the whole file; returns it ready to stage."""
        self.checkpoint()
        if not self.complete:
            raise DownloadError(f"{self.total - self.received} chunks missing")
        os.close(self._fd)
        self._fd = -1
        size = self.part.stat().st_size
        if size != self.manifest.size_bytes:
            raise DownloadError(f"size {size} != manifest {self.manifest.size_bytes}")
        digest = hashlib.sha256()
        with self.part.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != self.manifest.sha256:
            self.discard()
            raise DownloadError(f"sha256 {digest.hexdigest()[:16]}... does not match the "
                                f"manifest's {self.manifest.sha256[:16]}...")
        self._bitmap_file.unlink(missing_ok=True)
        return self.part

    def close(self) -> None:
        if self._fd >= 0:
            self.checkpoint()
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.part.unlink(missing_ok=True)
        self._bitmap_file.unlink(missing_ok=True)
