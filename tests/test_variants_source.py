"""Bad inputs to the variant pipeline: each is one clear error naming the file and the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from controller.variants.source import SourceError, load_data, load_source
from tests.variants_helpers import DATA, SOURCE


def test_the_demo_model_and_data_load() -> None:
    source = load_source(SOURCE)
    data = load_data(DATA, source)
    assert (source.model_name, source.input_name, source.output_name) == (
        "digits", "image", "logits")
    assert source.input_shape[1:] == (1, 8, 8)
    assert data.eval_x.shape[1:] == (1, 8, 8) and data.eval_x.dtype == np.float32


@pytest.mark.parametrize(("content", "problem"), [
    (b"\x00\x01garbage\xff" * 50, "not an ONNX model"),
    (b"name,value\na,1\n", "not an ONNX model"),
    (b"", "not an ONNX model"),
])
def test_a_corrupt_or_non_onnx_source_is_refused(tmp_path: Path, content: bytes,
                                                 problem: str) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(SourceError) as err:
        load_source(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_a_truncated_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "truncated.onnx"
    path.write_bytes(SOURCE.read_bytes()[: SOURCE.stat().st_size // 2])
    with pytest.raises(SourceError) as err:
        load_source(path)
    assert "truncated.onnx" in str(err.value)


def test_a_missing_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        load_source(tmp_path / "nope.onnx")


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_data_without_the_expected_arrays_names_them(tmp_path: Path) -> None:
    source = load_source(SOURCE)
    path = _write_npz(tmp_path / "d.npz", x=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(SourceError) as err:
        load_data(path, source)
    assert "missing arrays calib_x, calib_y, eval_x, eval_y" in str(err.value)
    assert "found x" in str(err.value)


def test_data_whose_shape_does_not_match_the_model_is_refused(tmp_path: Path) -> None:
    source = load_source(SOURCE)
    good = dict(np.load(DATA))
    bad = {**good, "eval_x": np.zeros((5, 3, 8, 8), np.float32), "eval_y": np.zeros(5, np.int64)}
    with pytest.raises(SourceError) as err:
        load_data(_write_npz(tmp_path / "d.npz", **bad), source)
    assert "eval_x has shape (5, 3, 8, 8)" in str(err.value)
    assert "digits.fp32.onnx takes ('N', 1, 8, 8)" in str(err.value)


def test_labels_must_be_integers_and_match_the_samples(tmp_path: Path) -> None:
    source = load_source(SOURCE)
    good = dict(np.load(DATA))
    with pytest.raises(SourceError, match="integer labels"):
        load_data(_write_npz(tmp_path / "a.npz",
                             **{**good, "calib_y": good["calib_y"].astype(np.float32)}), source)
    with pytest.raises(SourceError, match="calib_x has 300 samples and calib_y 299"):
        load_data(_write_npz(tmp_path / "b.npz", **{**good, "calib_y": good["calib_y"][:-1]}),
                  source)


def test_a_file_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_text("not numpy")
    with pytest.raises(SourceError, match=r"not a readable \.npz file"):
        load_data(path, load_source(SOURCE))
