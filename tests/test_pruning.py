"""Structured pruning (controller/variants/pruning.py) on the real demo model and its data, and on
small graphs built here: the result is a valid, smaller ONNX model, the least-squares refit is
what keeps it accurate, and every number is checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from controller.variants.graph_stats import graph_stats
from controller.variants.pruning import (
    PruneResult,
    UnprunableGraph,
    channel_importance,
    channels_to_keep,
    find_prunable_pairs,
    fit_linear,
    im2col,
    prune,
)

DIGITS = Path(__file__).resolve().parent.parent / "artifacts" / "digits"
OPSET = [helper.make_opsetid("", 17)]


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(DIGITS / "digits.fp32.onnx"))


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(DIGITS / "digits.data.npz", allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.fixture(scope="module")
def pruned(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> PruneResult:
    return prune(model, data["calib_x"])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(run(model, x).argmax(axis=1) == y))


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# ---- the demo model --------------------------------------------------------------------------

def test_finds_conv_conv_conv_flatten_gemm_and_gemm_gemm_pairs_from_the_graph(
        model: onnx.ModelProto) -> None:
    pairs = find_prunable_pairs(model)

    assert [(p.producer.name, p.consumer.name, p.flattened) for p in pairs] == [
        ("conv1", "conv2", False), ("conv2", "fc1", True), ("fc1", "fc2", False)]
    assert pairs[1].consumer_input == "/Flatten_output_0"


def test_pruned_model_passes_the_checker_and_keeps_io_names_and_dynamic_batch(
        model: onnx.ModelProto, pruned: PruneResult, data: dict[str, np.ndarray]) -> None:
    onnx.checker.check_model(pruned.model, full_check=True)
    onnx.shape_inference.infer_shapes(pruned.model, check_type=True, strict_mode=True)

    (image,), (logits,) = pruned.model.graph.input, pruned.model.graph.output
    assert (image.name, dims(image)) == ("image", ["N", 1, 8, 8])
    assert (logits.name, dims(logits)) == ("logits", ["N", 10])
    assert run(pruned.model, data["eval_x"][:1]).shape == (1, 10)
    assert run(pruned.model, data["eval_x"][:37]).shape == (37, 10)
    assert pruned.model.opset_import == model.opset_import


def test_default_pruning_halves_each_layer_for_at_least_2x_fewer_macs(
        model: onnx.ModelProto, pruned: PruneResult) -> None:
    before, after = graph_stats(model), graph_stats(pruned.model)

    assert [(layer.name, len(layer.kept), layer.total) for layer in pruned.layers] == [
        ("conv1", 8, 16), ("conv2", 16, 32), ("fc1", 32, 64)]
    assert (pruned.before, pruned.after) == (before, after)
    assert (before.params, before.macs) == (38_282, 337_536)
    assert 2 * after.macs <= before.macs
    assert after.params < before.params
    assert (after.params, after.macs) == (9_802, 86_848)
    assert pruned.summary() == ("params 38,282→9,802, MACs 337,536→86,848 (3.9\u00d7 fewer); "
                                "kept conv1 8/16, conv2 16/32, fc1 32/64")


def test_pruned_fp32_model_loses_at_most_one_point_on_the_eval_set(
        model: onnx.ModelProto, pruned: PruneResult, data: dict[str, np.ndarray]) -> None:
    fp32 = accuracy(model, data["eval_x"], data["eval_y"])

    assert accuracy(pruned.model, data["eval_x"], data["eval_y"]) >= fp32 - 0.01


def test_least_squares_refit_beats_plain_channel_removal_on_calibration_and_eval(
        model: onnx.ModelProto, pruned: PruneResult, data: dict[str, np.ndarray]) -> None:
    removed = prune(model, data["calib_x"], refit=False)

    for split in ("calib", "eval"):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        reference = run(model, x)
        refit_error = np.mean((run(pruned.model, x) - reference) ** 2)
        removal_error = np.mean((run(removed.model, x) - reference) ** 2)
        assert refit_error < 0.1 * removal_error, split
        assert accuracy(pruned.model, x, y) > accuracy(removed.model, x, y) + 0.2, split


def test_keeping_every_channel_reproduces_the_original_logits(
        model: onnx.ModelProto, data: dict[str, np.ndarray]) -> None:
    kept_all = prune(model, data["calib_x"], 1.0)

    assert np.max(np.abs(run(kept_all.model, data["eval_x"]) - run(model, data["eval_x"]))) < 1e-4
    assert kept_all.after == kept_all.before


def test_pruning_leaves_the_given_model_untouched(
        model: onnx.ModelProto, data: dict[str, np.ndarray]) -> None:
    original = model.SerializeToString()

    prune(model, data["calib_x"][:50], {"conv2": 0.5})

    assert model.SerializeToString() == original


def test_a_keep_ratio_for_a_layer_that_cannot_be_pruned_names_the_ones_that_can(
        model: onnx.ModelProto, data: dict[str, np.ndarray]) -> None:
    with pytest.raises(UnprunableGraph, match="cannot prune fc2: the prunable layers are "
                                              "conv1, conv2, fc1"):
        prune(model, data["calib_x"], {"fc2": 0.5})
    with pytest.raises(UnprunableGraph, match=r"keep ratios must be in \(0, 1\]"):
        prune(model, data["calib_x"], {"fc1": 0.0})


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ratios=st.tuples(*[st.floats(0.02, 1.0)] * 3))
def test_any_keep_ratios_give_a_valid_model_whose_macs_never_grow(
        model: onnx.ModelProto, data: dict[str, np.ndarray],
        ratios: tuple[float, float, float]) -> None:
    keep = dict(zip(("conv1", "conv2", "fc1"), ratios, strict=True))

    result = prune(model, data["calib_x"][:60], keep)

    onnx.checker.check_model(result.model, full_check=True)
    assert result.after.macs <= result.before.macs
    assert result.after.params <= result.before.params
    assert all(1 <= len(layer.kept) <= layer.total for layer in result.layers)
    assert np.isfinite(run(result.model, data["eval_x"][:5])).all()


# ---- small graphs built here -----------------------------------------------------------------

def mlp_with_redundant_hidden_units(rng: np.random.Generator) -> onnx.ModelProto:
    """x[N,4] -> fc_a 4->16 -> Relu -> fc_b 16->6 (stored [in, out]) -> Relu -> fc_c 6->3.

    fc_a's units 8..15 are fc_a's units 0..7 scaled by 0.01, so after the ReLU they carry no new
    information: a pruner that keeps units 0..7 and refits fc_b loses nothing.
    """
    first = rng.normal(size=(8, 4)).astype(np.float32)
    first_bias = rng.normal(size=8).astype(np.float32)
    weights = {
        "fc_a.weight": np.concatenate([first, 0.01 * first]),
        "fc_a.bias": np.concatenate([first_bias, 0.01 * first_bias]),
        "fc_b.weight": rng.normal(size=(16, 6)).astype(np.float32),
        "fc_b.bias": rng.normal(size=6).astype(np.float32),
        "fc_c.weight": rng.normal(size=(3, 6)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "fc_a.weight", "fc_a.bias"], ["a"], transB=1),
        helper.make_node("Relu", ["a"], ["a_relu"]),
        helper.make_node("Gemm", ["a_relu", "fc_b.weight", "fc_b.bias"], ["b"]),
        helper.make_node("Relu", ["b"], ["b_relu"]),
        helper.make_node("Gemm", ["b_relu", "fc_c.weight"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()])
    return helper.make_model(graph, opset_imports=OPSET, ir_version=8)


def test_gemm_only_model_loses_redundant_units_and_the_refit_absorbs_them() -> None:
    rng = np.random.default_rng(7)
    mlp = mlp_with_redundant_hidden_units(rng)
    x = rng.normal(size=(200, 4)).astype(np.float32)

    result = prune(mlp, x, {"fc_a": 0.5}, ridge=1e-10)

    onnx.checker.check_model(result.model, full_check=True)
    shapes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert result.layers[0].kept == tuple(range(8))
    assert shapes["fc_a.weight"] == (8, 4)
    assert shapes["fc_b.weight"] == (8, 6)          # transB=0: [in, out], in halved
    assert shapes["fc_c.weight"] == (3, 6)
    assert "fc_c.bias" in shapes                    # a refitted consumer gets a bias
    fresh = rng.normal(size=(50, 4)).astype(np.float32)
    assert np.max(np.abs(run(result.model, fresh) - run(mlp, fresh))) < 1e-3
    removed = prune(mlp, x, {"fc_a": 0.5}, refit=False)
    assert np.max(np.abs(run(removed.model, fresh) - run(mlp, fresh))) > 1e-2


def test_a_model_without_a_prunable_pair_is_refused_with_the_reason() -> None:
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "only.weight")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "only.weight"], ["g"], transB=1),
         helper.make_node("Sigmoid", ["g"], ["y"])], "one-layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [weight])
    one_layer = helper.make_model(graph, opset_imports=OPSET, ir_version=8)

    with pytest.raises(UnprunableGraph, match="no prunable pair: need a Conv or Gemm whose "
                                              "output reaches another Conv or Gemm"):
        prune(one_layer, np.ones((4, 4), np.float32))


def test_a_layer_whose_output_also_feeds_the_graph_output_is_not_pruned() -> None:
    mlp = mlp_with_redundant_hidden_units(np.random.default_rng(0))
    mlp.graph.output.append(helper.make_tensor_value_info("a_relu", TensorProto.FLOAT, None))

    assert [p.producer.name for p in find_prunable_pairs(mlp)] == ["fc_b"]


@pytest.mark.parametrize(("pads", "strides", "dilations"), [
    ((1, 1, 1, 1), (1, 1), (1, 1)),
    ((0, 0, 0, 0), (2, 2), (1, 1)),
    ((2, 1, 0, 1), (1, 2), (2, 1)),
], ids=["same", "strided", "dilated-asymmetric"])
def test_im2col_times_the_weights_is_what_onnxruntime_conv_computes(
        pads: tuple[int, ...], strides: tuple[int, int], dilations: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    w = rng.normal(size=(5, 3, 3, 2)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=pads, strides=strides,
                          dilations=dilations)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    expected = run(helper.make_model(graph, opset_imports=OPSET, ir_version=8), x)

    cols = im2col(x, (3, 2), pads, strides, dilations)
    got = (cols @ w.reshape(5, -1).T + b).reshape(2, *expected.shape[2:], 5)

    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, atol=1e-4)


def test_a_dead_channel_scores_zero_and_kept_channels_stay_in_order() -> None:
    activations = np.ones((10, 4, 3, 3), np.float32)
    activations[:, 2] = 0.0
    weight = np.ones((6, 4, 3, 3), np.float32)
    weight[:, 0] *= 3.0

    importance = channel_importance(activations, weight)

    assert importance[2] == 0.0
    assert importance[0] == pytest.approx(3 * importance[1])
    assert channels_to_keep(importance, 3).tolist() == [0, 1, 3]


def test_fit_linear_recovers_an_exact_affine_map() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6))
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)

    got_w, got_b = fit_linear(x, x @ w.T + b, ridge=1e-12)

    np.testing.assert_allclose(got_w, w, atol=1e-8)
    np.testing.assert_allclose(got_b, b, atol=1e-8)
