"""Paths of the demo model and data that the variant tests build from."""

from __future__ import annotations

from pathlib import Path

DIGITS = Path(__file__).resolve().parents[1] / "artifacts" / "digits"
SOURCE = DIGITS / "digits.fp32.onnx"
DATA = DIGITS / "digits.data.npz"
