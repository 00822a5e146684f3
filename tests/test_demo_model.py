"""The committed demo model (artifacts/digits): its graph and I/O contract, its real held-out
accuracy in onnxruntime, and the calibration/evaluation split it ships with. Needs onnx,
onnxruntime and numpy, never torch (only artifacts/digits/train.py, which rebuilds them, does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

DIGITS = Path(__file__).resolve().parent.parent / "artifacts" / "digits"
MODEL_PATH = DIGITS / "digits.fp32.onnx"
DATA_PATH = DIGITS / "digits.data.npz"
MIN_ACCURACY = 0.97
LAYERS = ("conv1", "conv2", "fc1", "fc2")


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(MODEL_PATH))


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(DATA_PATH, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    shape = value.type.tensor_type.shape
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in shape.dim]


def test_committed_model_passes_the_onnx_checker_and_shape_inference(
        model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def test_model_takes_image_n_1_8_8_float32_and_gives_logits_n_10(model: onnx.ModelProto) -> None:
    (image,), (logits,) = model.graph.input, model.graph.output
    assert image.name == "image"
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(image) == ["N", 1, 8, 8]
    assert logits.name == "logits"
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(logits) == ["N", 10]


def test_model_is_conv_layers_then_dense_layers_with_named_weights(
        model: onnx.ModelProto) -> None:
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Conv") == 2
    assert {"Gemm", "MatMul"} & set(ops)
    assert "Constant" not in ops  # every weight is an initializer, not a node
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    assert shapes == {
        "conv1.weight": [16, 1, 3, 3], "conv1.bias": [16],
        "conv2.weight": [32, 16, 3, 3], "conv2.bias": [32],
        "fc1.weight": [64, 512], "fc1.bias": [64],
        "fc2.weight": [10, 64], "fc2.bias": [10],
    }
    assert all(init.data_type == onnx.TensorProto.FLOAT for init in model.graph.initializer)


def test_model_metadata_names_the_model_and_its_version(model: onnx.ModelProto) -> None:
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["name"] == "digits"
    assert metadata["version"] == "1"
    assert metadata["training_seed"].isdigit()


def test_model_classifies_held_out_digits_at_97_percent_or_better(
        session: ort.InferenceSession, model: onnx.ModelProto,
        data: dict[str, np.ndarray]) -> None:
    logits = session.run(["logits"], {"image": data["eval_x"]})[0]
    assert logits.shape == (len(data["eval_y"]), 10)
    measured = float((logits.argmax(axis=1) == data["eval_y"]).mean())
    assert measured >= MIN_ACCURACY
    # The accuracy the model carries in its metadata is the one it really has.
    recorded = float({p.key: p.value for p in model.metadata_props}["eval_accuracy"])
    assert measured == pytest.approx(recorded, abs=1.5 / len(data["eval_y"]))


@pytest.mark.parametrize("batch", [1, 7])
def test_model_accepts_any_batch_size(session: ort.InferenceSession,
                                      data: dict[str, np.ndarray], batch: int) -> None:
    full = session.run(["logits"], {"image": data["eval_x"]})[0]
    part = session.run(["logits"], {"image": data["eval_x"][:batch]})[0]
    np.testing.assert_allclose(part, full[:batch], rtol=1e-5, atol=1e-5)


def test_data_has_calibration_and_evaluation_arrays_of_the_model_input_shape(
        data: dict[str, np.ndarray]) -> None:
    assert sorted(data) == ["calib_x", "calib_y", "eval_x", "eval_y"]
    for split in ("calib", "eval"):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        assert x.dtype == np.float32
        assert y.dtype == np.int64
        assert x.ndim == 4
        assert x.shape[1:] == (1, 8, 8)
        assert y.shape == (x.shape[0],)
    assert 250 <= len(data["calib_y"]) <= 350
    assert 400 <= len(data["eval_y"]) <= 500


def test_pixels_are_scaled_into_the_unit_range(data: dict[str, np.ndarray]) -> None:
    for name in ("calib_x", "eval_x"):
        assert data[name].min() >= 0.0
        assert data[name].max() <= 1.0
        # load_digits pixels are 0..16, so x * 16 is whole.
        np.testing.assert_array_equal(data[name] * 16, np.round(data[name] * 16))


def test_calibration_and_evaluation_share_no_sample(data: dict[str, np.ndarray]) -> None:
    calib = {row.tobytes() for row in data["calib_x"].reshape(len(data["calib_x"]), -1)}
    evaluation = {row.tobytes() for row in data["eval_x"].reshape(len(data["eval_x"]), -1)}
    assert len(calib) == len(data["calib_x"])
    assert len(evaluation) == len(data["eval_x"])
    assert calib.isdisjoint(evaluation)


def test_every_class_appears_in_calibration_and_in_evaluation(
        data: dict[str, np.ndarray]) -> None:
    for name in ("calib_y", "eval_y"):
        assert set(data[name].tolist()) == set(range(10))


def test_artifacts_stay_small() -> None:
    assert DATA_PATH.stat().st_size < 1_000_000
    assert MODEL_PATH.stat().st_size < 1_000_000
