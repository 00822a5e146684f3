"""Where the inference loop's inputs come from. Neither source ever waits on the network."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    x: np.ndarray
    labels: np.ndarray | None


class InputError(ValueError):
    pass


class ReplaySource:
    """A labelled npz (eval_x/eval_y, or x/y) replayed in a loop: gives on-device accuracy."""

    def __init__(self, path: Path, batch_size: int = 1) -> None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys = ("eval_x", "eval_y") if "eval_x" in npz.files else ("x", "y")
                self.x = npz[keys[0]].astype(np.float32)
                self.y = npz[keys[1]].astype(np.int64) if keys[1] in npz.files else None
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{path}: not a replay file with eval_x/eval_y or x/y ({exc})"
                             ) from None
        if len(self.x) == 0:
            raise InputError(f"{path}: no samples")
        self.batch_size = batch_size
        self._position = 0

    def next_batch(self) -> Batch:
        start, end = self._position, self._position + self.batch_size
        self._position = end % len(self.x)
        if end <= len(self.x):             # the usual case: a view, no copy
            return Batch(self.x[start:end], None if self.y is None else self.y[start:end])
        index = np.arange(start, end) % len(self.x)
        return Batch(self.x[index], None if self.y is None else self.y[index])

    def samples(self, count: int) -> Batch:
        """The first `count` samples (smoke tests use the same data every time)."""
        n = min(count, len(self.x))
        return Batch(self.x[:n], None if self.y is None else self.y[:n])


class DirectorySource:
    """New .npy files dropped into a folder, each one or more samples; renamed *.done after."""

    def __init__(self, directory: Path, batch_size: int = 1) -> None:
        if not directory.is_dir():
            raise InputError(f"{directory}: not a directory")
        self.directory = directory
        self.batch_size = batch_size
        self._pending: Iterator[np.ndarray] = iter(())

    def next_batch(self) -> Batch | None:
        rows = []
        for _ in range(self.batch_size):
            row = next(self._pending, None)
            if row is None:
                self._pending = self._load_next_file()
                row = next(self._pending, None)
            if row is None:
                break
            rows.append(row)
        return Batch(np.stack(rows), None) if rows else None

    def samples(self, count: int) -> Batch | None:
        return None  # no fixed validation data in a drop folder

    def _load_next_file(self) -> Iterator[np.ndarray]:
        for path in sorted(self.directory.glob("*.npy")):
            try:
                array = np.load(path, allow_pickle=False).astype(np.float32)
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: %s", path, exc)
                path.rename(path.with_suffix(".bad"))
                continue
            path.rename(path.with_suffix(".done"))
            return iter(array if array.ndim > 3 else array[None])
        return iter(())
