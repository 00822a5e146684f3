"""Structured pruning of an FP32 ONNX model without a training loop.

Whole output channels (Conv) or hidden units (Gemm) are removed, which is the only kind of
sparsity that makes onnxruntime faster; the next layer is then refitted by least squares so that
its outputs on the calibration set match the unpruned network's. Works on any chain of
Conv/Gemm layers joined by Relu, MaxPool and Flatten, found from the graph, not from names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from controller.variants.graph_stats import GraphStats, graph_stats

if TYPE_CHECKING:
    import onnx

# Half the channels of every prunable layer: on the demo model 3.9x fewer MACs (conv2, 87% of
# the work, loses half its inputs and half its outputs). Chosen on the calibration split alone:
# in 10-fold cross-validation there (prune and quantize on 9 folds, judge the 10th), pruned INT8
# got 299 of 300 right, against 300 for FP32; keeping 5/8 cost the same and saved less.
DEFAULT_KEEP = 0.5
# Ridge strength relative to the mean variance of the refit's inputs, for stability. The
# Flatten->Gemm refit has about as many unknowns as calibration samples (257 against 300 on the
# demo model), where plain least squares fits noise; across 1e-5..1e-1 on held-out calibration
# halves, 1e-2 gave the smallest logit error and the best INT8 accuracy.
DEFAULT_RIDGE = 1e-2
# Ops that act on each channel alone, so a channel can be removed on either side of them.
CHANNELWISE_OPS = frozenset({"Relu", "MaxPool"})
# im2col rows beyond this are sampled: a big model's calibration set would not fit in memory.
MAX_REFIT_ROWS = 200_000


class UnprunableGraph(ValueError):
    """The model has nothing this pruner can remove, or a keep ratio names no prunable layer."""


@dataclass(frozen=True)
class Layer:
    """A Conv or Gemm node whose weights are initializers, seen as [out, in, ...] weights."""

    node: int                      # index in graph.node
    name: str                      # "conv1" for weight "conv1.weight", else the node's name
    op: str                        # "Conv" or "Gemm"
    weight: str
    bias: str | None
    transposed: bool               # Gemm with transB=0 stores [in, out]
    output: str
    pads: tuple[int, ...] = (0, 0, 0, 0)
    strides: tuple[int, ...] = (1, 1)
    dilations: tuple[int, ...] = (1, 1)


@dataclass(frozen=True)
class PrunablePair:
    """A producer whose output channels reach a consumer through channel-wise ops only."""

    producer: Layer
    consumer: Layer
    consumer_input: str            # the tensor the consumer reads (after Relu, MaxPool, Flatten)
    flattened: bool                # Conv -> ... -> Flatten -> Gemm: inputs are H*W blocks


@dataclass(frozen=True)
class PrunedLayer:
    name: str
    kept: tuple[int, ...]          # the output channels or units kept, ascending
    total: int


@dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    layers: tuple[PrunedLayer, ...]
    before: GraphStats
    after: GraphStats

    def summary(self) -> str:
        """One line for an operator: parameters and MACs before and after, channels kept."""
        kept = ", ".join(f"{layer.name} {len(layer.kept)}/{layer.total}" for layer in self.layers)
        ratio = self.before.macs / max(self.after.macs, 1)
        return (f"params {self.before.params:,}→{self.after.params:,}, MACs "
                f"{self.before.macs:,}→{self.after.macs:,} ({ratio:.1f}× fewer); "  # noqa: RUF001
                f"kept {kept}")


# ---- the graph: which layers can lose channels -----------------------------------------------

def find_prunable_pairs(model: onnx.ModelProto) -> tuple[PrunablePair, ...]:
    """Every producer -> consumer pair in graph order, e.g. conv1->conv2, conv2->fc1, fc1->fc2."""
    graph = model.graph
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    outputs = {o.name for o in graph.output}
    weights = {i.name: i for i in graph.initializer}
    pairs = []
    for index in range(len(graph.node)):
        producer = _layer(model, index, weights, readers)
        if producer is None:
            continue
        pair = _follow(model, producer, readers, outputs, weights)
        if pair is not None:
            pairs.append(pair)
    return tuple(pairs)


def _layer(model: onnx.ModelProto, index: int, weights: Mapping[str, onnx.TensorProto],
           readers: Mapping[str, list[int]]) -> Layer | None:
    """The node as a prunable layer, or None when its weights or attributes rule that out."""
    import onnx
    from onnx import helper

    node = model.graph.node[index]
    if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx"):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    # A weight shared with another node cannot lose rows for this one alone.
    if any(name not in weights or len(readers.get(name, [])) != 1
           for name in (weight, bias) if name is not None):
        return None
    w = weights[weight]
    if w.data_type != onnx.TensorProto.FLOAT:
        return None
    out_axis = 0
    if node.op_type == "Conv":
        if attrs.get("group", 1) != 1 or len(w.dims) != 4:
            return None
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
    else:
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0 or len(w.dims) != 2:
            return None
        out_axis = 0 if attrs.get("transB", 0) else 1
    if bias is not None and list(weights[bias].dims) != [w.dims[out_axis]]:
        return None
    stem = weight.removesuffix(".weight") if weight.endswith(".weight") else ""
    return Layer(
        node=index, name=stem or node.name or weight, op=node.op_type, weight=weight,
        bias=bias, transposed=out_axis == 1, output=node.output[0],
        pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
        strides=tuple(attrs.get("strides", (1, 1))),
        dilations=tuple(attrs.get("dilations", (1, 1))))


def _follow(model: onnx.ModelProto, producer: Layer, readers: Mapping[str, list[int]],
            outputs: set[str], weights: Mapping[str, onnx.TensorProto]) -> PrunablePair | None:
    """Walks from the producer through channel-wise ops to the one layer that reads it."""
    from onnx import helper

    tensor, flattened = producer.output, False
    while True:
        users = readers.get(tensor, [])
        if tensor in outputs or len(users) != 1:
            return None
        node = model.graph.node[users[0]]
        if node.input[0] != tensor:
            return None
        consumer = _layer(model, users[0], weights, readers)
        if consumer is not None:
            fits = (consumer.op == "Conv" and producer.op == "Conv" and not flattened) or (
                consumer.op == "Gemm" and (producer.op == "Gemm" or flattened))
            return PrunablePair(producer, consumer, tensor, flattened) if fits else None
        extra_outputs = [o for o in node.output[1:] if o]
        if extra_outputs or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Flatten" and producer.op == "Conv" and not flattened:
            axis = next((helper.get_attribute_value(a) for a in node.attribute
                         if a.name == "axis"), 1)
            if axis != 1:
                return None
            flattened = True
        elif node.op_type not in CHANNELWISE_OPS or flattened:
            return None
        tensor = node.output[0]


# ---- the numbers: importance, removal, refit (pure numpy) ------------------------------------

def channel_importance(activations: np.ndarray, consumer_weight: np.ndarray) -> np.ndarray:
    """Per channel: RMS of its activation times the norm of the consumer weights reading it.

    For a Gemm consumer this is exactly the RMS of the channel's contribution to the consumer's
    output (||w_c|| * rms(a_c)); for a Conv consumer it is that bound over its kernel. Both
    factors matter: a dead ReLU channel scores 0 however big its outgoing weights, and a busy
    channel that the consumer barely reads scores low. `activations` is [N, C, ...] as the
    consumer reads them; `consumer_weight` is [out, C, ...] (Flatten blocks already split).
    """
    channels = activations.shape[1]
    rms = np.sqrt(np.mean(np.square(activations.reshape(len(activations), channels, -1),
                                    dtype=np.float64), axis=(0, 2)))
    norm = np.linalg.norm(np.moveaxis(consumer_weight, 1, 0).reshape(channels, -1), axis=1)
    return np.asarray(rms * norm)


def channels_to_keep(importance: np.ndarray, count: int) -> np.ndarray:
    """The `count` most important channels, in their original order (ties: lower index)."""
    order = np.argsort(-importance, kind="stable")
    return np.sort(order[:count])


def keep_count(ratio: float, total: int) -> int:
    return max(1, min(total, round(ratio * total)))


def fit_linear(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y ~ x @ w.T + b with a ridge on w (not on b); returns w [out, in], b [out].

    The ridge is relative to the mean variance of x's columns, so it means the same thing at
    any activation scale; solved on centred normal equations in float64.
    """
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    x_mean, y_mean = x64.mean(axis=0), y64.mean(axis=0)
    xc, yc = x64 - x_mean, y64 - y_mean
    gram = xc.T @ xc
    scale = np.trace(gram) / max(len(gram), 1)
    gram[np.diag_indices_from(gram)] += ridge * scale if scale > 0 else ridge
    w = np.linalg.solve(gram, xc.T @ yc).T
    return w, y_mean - w @ x_mean


def im2col(x: np.ndarray, kernel: tuple[int, int], pads: Sequence[int],
           strides: Sequence[int], dilations: Sequence[int]) -> np.ndarray:
    """Conv input [N, C, H, W] as rows [N*Ho*Wo, C*kh*kw], ordered like Conv's weights."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]          # [N, C, Ho, Wo, kh, kw]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def refit_consumer(pair: PrunablePair, inputs: np.ndarray, target: np.ndarray,
                   weight_shape: tuple[int, ...], ridge: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """New consumer weights [out, in, ...] and bias making its output on `inputs` (the kept
    channels, as the pruned network gives them) match `target` (the original network's)."""
    if pair.consumer.op == "Gemm":
        w, b = fit_linear(inputs, target, ridge)
        return w.reshape(weight_shape), b
    kernel = (weight_shape[2], weight_shape[3])
    cols = im2col(inputs, kernel, pair.consumer.pads, pair.consumer.strides,
                  pair.consumer.dilations)
    rows = np.moveaxis(target, 1, -1).reshape(len(cols), -1)   # [N*Ho*Wo, out]
    if len(cols) > MAX_REFIT_ROWS:
        pick = np.random.default_rng(0).choice(len(cols), MAX_REFIT_ROWS, replace=False)
        cols, rows = cols[pick], rows[pick]
    w, b = fit_linear(cols, rows, ridge)
    return w.reshape(weight_shape), b


# ---- one pass over the graph -----------------------------------------------------------------

def prune(model: onnx.ModelProto, calib_x: np.ndarray,
          keep: Mapping[str, float] | float = DEFAULT_KEEP, *, refit: bool = True,
          ridge: float = DEFAULT_RIDGE) -> PruneResult:
    """A new model with each prunable layer keeping `keep` of its output channels.

    `keep` is one ratio for every prunable layer or a ratio per layer name (others keep all).
    Pairs are handled front to back; each refit reads the already-pruned network's activations
    and aims at the original network's outputs, so errors are corrected, not compounded.
    """
    x = np.ascontiguousarray(calib_x, dtype=np.float32)
    if len(x) == 0:
        raise UnprunableGraph("no calibration samples")
    pairs = find_prunable_pairs(model)
    if not pairs:
        raise UnprunableGraph("no prunable pair: need a Conv or Gemm whose output reaches "
                              "another Conv or Gemm only through Relu, MaxPool or Flatten")
    ratios = _ratios(pairs, keep)
    # A refit sets the consumer's bias, so each consumer gets one (zero, hence exact) up front.
    biased = _with_biases(model, [p.consumer for p in pairs if p.consumer.bias is None])
    pairs = find_prunable_pairs(biased)
    targets = _run(biased, x, [p.consumer.output for p in pairs])
    weights = {i.name: _to_array(i) for i in biased.graph.initializer}
    current, changed, layers = biased, False, []
    for pair in pairs:
        inputs = _run(current, x, [pair.consumer_input])[pair.consumer_input]
        total = _out_in(weights[pair.producer.weight], pair.producer).shape[0]
        count = keep_count(ratios[pair.producer.name], total)
        changed = changed or count < total
        # Refit only once something upstream has changed: with nothing removed the original
        # weights are already exact, and a refit would only add its ridge's bias.
        updates, kept = _prune_pair(weights, pair, inputs, count,
                                   targets[pair.consumer.output] if refit and changed else None,
                                   ridge)
        weights |= updates
        layers.append(PrunedLayer(pair.producer.name, tuple(int(k) for k in kept), total))
        current = _rebuild(biased, weights)
    return PruneResult(current, tuple(layers), graph_stats(model), graph_stats(current))


def _prune_pair(weights: Mapping[str, np.ndarray], pair: PrunablePair, inputs: np.ndarray,
               count: int, target: np.ndarray | None, ridge: float
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The pair's new initializers with `count` producer channels kept, and which were kept.

    `inputs` is what the consumer reads in the network pruned so far; with a `target` (the
    original network's consumer output) the consumer is refitted, else only sliced.
    """
    producer, consumer = pair.producer, pair.consumer
    producer_w = _out_in(weights[producer.weight], producer)
    channels = len(producer_w)
    consumer_w = _split_blocks(_out_in(weights[consumer.weight], consumer), pair, channels)
    per_channel = inputs.reshape(len(inputs), channels, -1)
    kept = channels_to_keep(channel_importance(per_channel, consumer_w), count)
    if consumer.bias is None:
        raise ValueError(f"{consumer.name} has no bias to refit (prune() adds one)")
    new_w, new_b = consumer_w[:, kept], weights[consumer.bias]
    if target is not None:
        kept_inputs = per_channel[:, kept].reshape(
            (len(inputs), -1) if pair.flattened else (len(inputs), len(kept), *inputs.shape[2:]))
        new_w, new_b = refit_consumer(pair, kept_inputs, target, new_w.shape, ridge)
    updates = {
        producer.weight: _from_out_in(producer_w[kept], producer),
        consumer.weight: _from_out_in(new_w.reshape(len(new_w), -1) if pair.flattened else new_w,
                                      consumer),
        consumer.bias: np.asarray(new_b, dtype=np.float32),
    }
    if producer.bias is not None:
        updates[producer.bias] = weights[producer.bias][kept]
    return updates, kept


def _ratios(pairs: Sequence[PrunablePair], keep: Mapping[str, float] | float
            ) -> dict[str, float]:
    names = [p.producer.name for p in pairs]
    chosen = dict.fromkeys(names, float(keep)) if isinstance(keep, (int, float)) else {
        name: 1.0 for name in names} | dict(keep)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise UnprunableGraph(f"cannot prune {', '.join(unknown)}: the prunable layers are "
                              f"{', '.join(names)}")
    bad = {name: ratio for name, ratio in chosen.items() if not 0.0 < ratio <= 1.0}
    if bad:
        raise UnprunableGraph(f"keep ratios must be in (0, 1], got {bad}")
    return chosen


def _out_in(w: np.ndarray, layer: Layer) -> np.ndarray:
    return w.T if layer.transposed else w


def _from_out_in(w: np.ndarray, layer: Layer) -> np.ndarray:
    return np.ascontiguousarray(w.T if layer.transposed else w, dtype=np.float32)


def _split_blocks(consumer_w: np.ndarray, pair: PrunablePair, channels: int) -> np.ndarray:
    """A Gemm after Flatten reads channel c as the columns c*H*W ... (c+1)*H*W - 1."""
    if not pair.flattened:
        return consumer_w
    out, width = consumer_w.shape
    if width % channels:
        raise UnprunableGraph(f"{pair.consumer.name} reads {width} inputs, not a multiple of "
                              f"{pair.producer.name}'s {channels} channels")
    return consumer_w.reshape(out, channels, width // channels)


# ---- onnx in and out --------------------------------------------------------------------------

def _to_array(tensor: onnx.TensorProto) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _unused_name(model: onnx.ModelProto, wanted: str) -> str:
    taken = {i.name for i in model.graph.initializer} | {
        name for node in model.graph.node for name in (*node.input, *node.output)}
    name, suffix = wanted, 1
    while name in taken:
        name, suffix = f"{wanted}_{suffix}", suffix + 1
    return name


def _with_biases(model: onnx.ModelProto, layers: Sequence[Layer]) -> onnx.ModelProto:
    """The model with a zero bias initializer on each of `layers` (which have none)."""
    import onnx
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for layer in layers:
        node = copy.graph.node[layer.node]
        out_axis = 1 if layer.transposed else 0
        size = next(i.dims[out_axis] for i in copy.graph.initializer if i.name == layer.weight)
        name = _unused_name(copy, f"{layer.name}.bias")
        copy.graph.initializer.append(numpy_helper.from_array(np.zeros(size, np.float32), name))
        del node.input[2:]
        node.input.append(name)
    return copy


def _rebuild(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The model with new initializer values; shapes inferred afresh (the old ones are stale)."""
    import onnx
    from onnx import numpy_helper

    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(model)
    del rebuilt.graph.value_info[:]
    del rebuilt.graph.initializer[:]
    rebuilt.graph.initializer.extend(numpy_helper.from_array(weights[i.name], i.name)
                                     for i in model.graph.initializer)
    return onnx.shape_inference.infer_shapes(rebuilt, check_type=True, strict_mode=True)


def _run(model: onnx.ModelProto, x: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values of the named tensors for input `x`, computed by onnxruntime on the CPU."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name)
                              for name in dict.fromkeys(names) if name not in present)
    options = ort.SessionOptions()
    # Fusions may drop intermediate tensors; the values must be the graph's own.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    values = session.run(list(names), {input_name: x})
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}
