"""The controller's two ways to write a file that matters (keys, certificates, the CA's record,
the key chain): a private key is created once and never replaced; anything else is replaced
whole, so a crash leaves the old file or the new one, never a part."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """A private key: created 0600 with O_EXCL, so an existing key is never replaced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Temp file beside it, fsync, rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
