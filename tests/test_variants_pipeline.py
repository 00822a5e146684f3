"""The variant pipeline end to end on the demo model, with the real ONNX builders, and its
behaviour when builders fail: the others still run, and nothing half-written is left."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from controller.cli import main
from controller.variants.builders.base import BuildError, BuiltVariant
from controller.variants.pipeline import BUILDERS, PipelineReport, build_variants
from controller.variants.record import RECORD_SUFFIX, load_records
from controller.variants.source import EvalData, SourceModel
from controller.variants.summary import summarize
from edgefleet.contract import VariantKind
from tests.variants_helpers import DATA, SOURCE

ONNX_KINDS = [VariantKind.ONNX_FP32, VariantKind.ONNX_FP16, VariantKind.ONNX_INT8]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PipelineReport]:
    out = tmp_path_factory.mktemp("variants")
    return out, build_variants(SOURCE, DATA, out, kinds=ONNX_KINDS)


def test_each_requested_variant_is_filed_with_a_record(
        built: tuple[Path, PipelineReport]) -> None:
    out, report = built
    assert report.failures == []
    records = {r.variant_kind: r for r in load_records(out)}
    assert set(records) == set(ONNX_KINDS)
    for record in records.values():
        assert (out / record.file).stat().st_size == record.size_bytes
        assert record.artifact_id.startswith(f"digits-v1-{record.variant_kind.value}-")
        assert record.metrics.accuracy == record.measurement.accuracy
    assert not list(out.glob(".building-*"))


def test_int8_keeps_accuracy_shrinks_and_loads_on_old_runtimes(
        built: tuple[Path, PipelineReport]) -> None:
    out, _ = built
    rows = {row.record.variant_kind: row for row in summarize(load_records(out))}
    int8 = rows[VariantKind.ONNX_INT8]
    assert int8.accuracy_delta_points is not None and int8.accuracy_delta_points >= -0.5
    assert int8.size_ratio is not None and int8.size_ratio <= 0.3
    model = onnx.load(str(out / int8.record.file))
    assert [o.domain for o in model.opset_import] == [""]  # no ai.onnx.ml stamp for ort 1.17
    assert model.ir_version <= 9
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert int8.record.measurement.execution == "onnxruntime/CPUExecutionProvider"


def test_fp16_is_honest_about_running_on_a_cpu(built: tuple[Path, PipelineReport]) -> None:
    out, _ = built
    fp16 = next(r for r in load_records(out) if r.variant_kind is VariantKind.ONNX_FP16)
    assert fp16.runtime.targets == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert not fp16.runtime.cpu_fallback
    assert fp16.measurement.execution == "onnxruntime/CPUExecutionProvider"
    assert "TensorrtExecutionProvider" in fp16.measurement.fallback_reason
    assert any("not faster" in n for n in fp16.notes)
    model = onnx.load(str(out / fp16.file))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert fp16.measurement.agreement is not None and fp16.measurement.agreement >= 0.99


def test_show_prints_the_table_and_json_with_ratios(built: tuple[Path, PipelineReport]) -> None:
    out, _ = built
    result = CliRunner().invoke(main, ["variants", "show", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["kind"]: row for row in json.loads(result.output)}
    assert rows["onnx-fp32"]["size_ratio"] == 1.0
    assert 0 < rows["onnx-int8"]["size_ratio"] < 1
    table = CliRunner().invoke(main, ["variants", "show", str(out)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "onnx-int8" in table.output and "not faster" in table.output


def _fake_builders(tmp_marker: list[Path]) -> dict[VariantKind, object]:
    def fails_cleanly(source: SourceModel, data: EvalData, workdir: Path) -> BuiltVariant:
        half = workdir / "half-written.onnx"
        half.write_bytes(b"partial")
        tmp_marker.append(half)
        raise BuildError("operator Foo is not supported")

    def crashes(source: SourceModel, data: EvalData, workdir: Path) -> BuiltVariant:
        raise ZeroDivisionError("builder bug")

    return {VariantKind.ONNX_FP32: BUILDERS[VariantKind.ONNX_FP32],
            VariantKind.ONNX_FP16: fails_cleanly, VariantKind.ONNX_INT8: crashes}


def test_failing_builders_are_reported_and_the_others_still_build(tmp_path: Path) -> None:
    written: list[Path] = []
    seen: list[tuple[VariantKind, str]] = []
    report = build_variants(SOURCE, DATA, tmp_path, builders=_fake_builders(written),  # type: ignore[arg-type]
                            progress=lambda kind, what: seen.append((kind, what)))
    assert [r.variant_kind for r in report.records] == [VariantKind.ONNX_FP32]
    reasons = {f.kind: f.reason for f in report.failures}
    assert reasons[VariantKind.ONNX_FP16] == "operator Foo is not supported"
    assert reasons[VariantKind.ONNX_INT8] == "unexpected ZeroDivisionError: builder bug"
    assert written and not written[0].exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["digits-v1.onnx-fp32.onnx", f"digits-v1.onnx-fp32.onnx{RECORD_SUFFIX}"]
    assert (VariantKind.ONNX_FP16, "failed: operator Foo is not supported") in seen


def test_stale_scratch_from_a_killed_build_is_cleared(tmp_path: Path) -> None:
    (tmp_path / ".building-onnx-int8-abc").mkdir()
    (tmp_path / ".building-onnx-int8-abc" / "x.onnx").write_bytes(b"partial")
    build_variants(SOURCE, DATA, tmp_path, kinds=[VariantKind.ONNX_FP32])
    assert not list(tmp_path.glob(".building-*"))


def test_cli_build_refuses_a_corrupt_source_with_one_line_and_writes_nothing(
        tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["variants", "build", str(bad), "--data", str(DATA),
                                       "--out", str(out)])
    assert result.exit_code == 1
    assert "bad.onnx: not an ONNX model" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_build_with_only_builds_those_kinds(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["variants", "build", str(SOURCE), "--data", str(DATA),
                                       "--out", str(tmp_path), "--only", "onnx-fp32",
                                       "--version", "7"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "onnx-fp32          done" in result.output
    assert [r.model_version for r in load_records(tmp_path)] == [7]


def test_show_refuses_a_folder_whose_file_was_truncated(tmp_path: Path) -> None:
    build_variants(SOURCE, DATA, tmp_path, kinds=[VariantKind.ONNX_FP32])
    artifact = next(p for p in tmp_path.glob("*.onnx"))
    artifact.write_bytes(artifact.read_bytes()[:100])
    result = CliRunner().invoke(main, ["variants", "show", str(tmp_path)])
    assert result.exit_code == 1 and "the record says" in result.output
