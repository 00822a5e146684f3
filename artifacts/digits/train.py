"""Trains the demo model that every edgefleet variant is built from: a small CNN on scikit-learn's
load_digits, exported as FP32 ONNX together with the fixed calibration/evaluation split the
variant pipeline uses. Only this script needs torch; nothing that runs on a controller or a
device imports it.

    python artifacts/digits/train.py [--out artifacts/digits]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 20240901
EVAL_FRACTION = 0.25  # held out from training and calibration alike
CALIB_SIZE = 300  # drawn from the training part, as a quantizer would see it in the field
EPOCHS = 40
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
OPSET = 17
MIN_ACCURACY = 0.97
MAX_ORT_DIFF = 1e-4

ONNX_NAME = "digits.fp32.onnx"
DATA_NAME = "digits.data.npz"
# The clean graph later tooling (pruning, FP16, INT8, onnx2tf) is written against.
ALLOWED_OPS = frozenset({"Conv", "Relu", "MaxPool", "Flatten", "Reshape", "Gemm", "MatMul", "Add"})
# A fixed timestamp for the npz members: zipfile stamps each with the current time otherwise,
# and the file must come out byte-identical on every run.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class DigitsSplit:
    train_x: np.ndarray  # float32 [N, 1, 8, 8] in [0, 1]
    train_y: np.ndarray  # int64 [N]
    calib_x: np.ndarray
    calib_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray


class DigitsNet(nn.Module):
    """Conv(1→16)+ReLU, Conv(16→32)+ReLU, MaxPool 2 → [32, 4, 4], Linear(512→64)+ReLU,
    Linear(64→10). The attribute names become the ONNX initializer names (conv1.weight, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(image))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    # One thread: a different thread count changes the order of float sums, and so the weights.
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def split_digits(seed: int) -> DigitsSplit:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    train_x, eval_x, train_y, eval_y = train_test_split(
        x, y, test_size=EVAL_FRACTION, stratify=y, random_state=seed)
    _, calib_x, _, calib_y = train_test_split(
        train_x, train_y, test_size=CALIB_SIZE, stratify=train_y, random_state=seed)
    return DigitsSplit(train_x=train_x, train_y=train_y, calib_x=calib_x, calib_y=calib_y,
                       eval_x=eval_x, eval_y=eval_y)


def shift_by_one_pixel(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Moves each image by -1, 0 or +1 pixels on each axis, filling with background (0)."""
    padded = nn.functional.pad(batch, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (batch.shape[0], 2), generator=generator)
    shifted = torch.empty_like(batch)
    for dy in range(3):
        for dx in range(3):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            shifted[chosen] = padded[chosen, :, dy:dy + 8, dx:dx + 8]
    return shifted


def train(model: DigitsNet, x: np.ndarray, y: np.ndarray, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps_per_epoch = -(-len(inputs) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, epochs=EPOCHS, steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), BATCH_SIZE):
            picked = order[start:start + BATCH_SIZE]
            batch = shift_by_one_pixel(inputs[picked], generator)
            optimizer.zero_grad()
            loss_fn(model(batch), targets[picked]).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def logits_of(model: DigitsNet, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def count_parameters(model: DigitsNet) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: DigitsNet) -> int:
    """Multiply-accumulates for one image: each conv output element costs in_ch * k * k, each
    linear output in_features. ReLU and pooling are not counted."""
    macs = 0
    for conv in (model.conv1, model.conv2):  # both keep the 8x8 size (padding 1)
        kh, kw = conv.kernel_size
        macs += 8 * 8 * conv.out_channels * conv.in_channels * kh * kw
    for linear in (model.fc1, model.fc2):
        macs += linear.out_features * linear.in_features
    return macs


def export_onnx(model: DigitsNet, metadata: dict[str, str]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but still gives the plainest graph
        # (Conv/Relu/MaxPool/Flatten/Gemm, weights as named initializers).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), buffer, dynamo=False, opset_version=OPSET,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    proto = onnx.load_from_string(buffer.getvalue())
    for node in proto.graph.node:
        node.doc_string = ""
    proto.doc_string = ("edgefleet demo model: 8x8 digit classifier (scikit-learn load_digits), "
                        "input image [N,1,8,8] float32 in [0,1] (pixel/16), output logits [N,10].")
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def check_graph(proto: onnx.ModelProto) -> None:
    ops = {node.op_type for node in proto.graph.node}
    if not ops <= ALLOWED_OPS:
        raise SystemExit(f"unexpected ops in the exported graph: {sorted(ops - ALLOWED_OPS)}")
    names = {init.name for init in proto.graph.initializer}
    expected = {f"{layer}.{part}" for layer in ("conv1", "conv2", "fc1", "fc2")
                for part in ("weight", "bias")}
    if names != expected:
        raise SystemExit(f"initializers are {sorted(names)}, expected {sorted(expected)}")


def check_onnxruntime(path: Path, x: np.ndarray, torch_logits: np.ndarray) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"image": x})[0]
    single = session.run(["logits"], {"image": x[:1]})[0]  # the batch dimension is dynamic
    diff = float(np.abs(ort_logits - torch_logits).max())
    if diff >= MAX_ORT_DIFF or single.shape != (1, 10):
        raise SystemExit(f"onnxruntime disagrees with torch: max abs diff {diff:.2e}")
    return diff


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What np.savez_compressed writes, with fixed member timestamps so the bytes repeat."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w") as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array),
                                          allow_pickle=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory for the ONNX model and the npz (default: next to "
                             "this script)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    seed_everything(SEED)
    split = split_digits(SEED)
    model = DigitsNet()
    train(model, split.train_x, split.train_y, SEED)

    eval_logits = logits_of(model, split.eval_x)
    eval_accuracy = accuracy(eval_logits, split.eval_y)
    if eval_accuracy < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {eval_accuracy:.4f} is below {MIN_ACCURACY}")
    params, macs = count_parameters(model), count_macs(model)

    metadata = {
        "name": "digits",
        "version": "1",
        "dataset": "sklearn.datasets.load_digits, x/16, stratified split",
        "training_seed": str(SEED),
        "eval_accuracy": f"{eval_accuracy:.4f}",
        "eval_samples": str(len(split.eval_y)),
        "parameters": str(params),
        "macs_per_image": str(macs),
    }
    proto = export_onnx(model, metadata)
    check_graph(proto)
    onnx_path = args.out / ONNX_NAME
    onnx_path.write_bytes(proto.SerializeToString())
    diff = check_onnxruntime(onnx_path, split.eval_x, eval_logits)

    data_path = args.out / DATA_NAME
    save_npz(data_path, {"calib_x": split.calib_x, "calib_y": split.calib_y,
                         "eval_x": split.eval_x, "eval_y": split.eval_y})

    print(f"train {len(split.train_y)}  calib {len(split.calib_y)}  eval {len(split.eval_y)}")
    print(f"parameters {params}  MACs/image {macs}")
    print(f"held-out accuracy {eval_accuracy:.4f}  onnxruntime max abs diff {diff:.2e}")
    print(f"{onnx_path} ({onnx_path.stat().st_size} bytes)")
    print(f"{data_path} ({data_path.stat().st_size} bytes)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
