"""`edgefleet variants build|show`: build a model's variants and show what they measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from controller.cli.output import console
from controller.variants.record import RecordError, VariantRecord, load_records
from controller.variants.source import SourceError
from controller.variants.summary import summarize
from edgefleet.contract import VariantKind

KIND_NAMES = [k.value for k in VariantKind if k is not VariantKind.UNKNOWN]


@click.group()
def variants() -> None:
    """Model variants: build them from one FP32 ONNX model, and show their figures."""


@variants.command("build")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="npz with calib_x, calib_y, eval_x, eval_y.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder; it is the variant registry until the database holds them.")
@click.option("--only", "only", multiple=True, type=click.Choice(KIND_NAMES),
              help="Build only these kinds (repeatable). Default: all.")
@click.option("--version", "model_version", type=click.IntRange(min=1),
              help="Model version (default: the source's metadata 'version', else 1).")
def variants_build(source: Path, data_path: Path, out_dir: Path, only: tuple[str, ...],
                   model_version: int | None) -> None:
    """Build every variant of SOURCE, measure each with its runtime, and print the table."""
    from controller.variants.pipeline import build_variants

    out = console()

    def progress(kind: VariantKind, what: str) -> None:
        style = "red" if what.startswith("failed") else "dim" if what != "done" else "green"
        out.print(f"[{style}]{kind.value:<18} {what}[/{style}]")

    try:
        report = build_variants(source, data_path, out_dir,
                                kinds=[VariantKind(k) for k in only] or None,
                                model_version=model_version, progress=progress)
    except SourceError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        records = load_records(out_dir)
    except RecordError as exc:
        raise click.ClickException(str(exc)) from None
    print_table(records, out_dir)
    for failure in report.failures:
        out.print(f"[red]{failure.kind.value}: not built: {failure.reason}[/red]")
    if report.failures:
        sys.exit(1)


@variants.command("show")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def variants_show(directory: Path, as_json: bool) -> None:
    """Print the variants table of a folder built by `variants build`."""
    try:
        records = load_records(directory)
    except RecordError as exc:
        raise click.ClickException(str(exc)) from None
    if not records:
        raise click.ClickException(f"{directory}: no variant records")
    if as_json:
        click.echo(json.dumps([row.as_dict() for row in summarize(records)], indent=2))
    else:
        print_table(records, directory)


def _ratio(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}x"


def print_table(records: list[VariantRecord], directory: Path) -> None:
    table = Table(title=f"Variants in {directory}")
    for column in ("kind", "size", "sizex", "accuracy", "Δ pts", "agree", "p50 ms", "p95 ms",
                   "latencyx", "throughput", "MACsx", "ran on"):
        table.add_column(column, overflow="fold")
    for row in summarize(records):
        r, m = row.record, row.record.measurement
        table.add_row(
            r.variant_kind.value, f"{r.size_bytes / 1024:.1f} KiB", _ratio(row.size_ratio),
            f"{m.accuracy:.4f}",
            "" if row.accuracy_delta_points is None else f"{row.accuracy_delta_points:+.2f}",
            "" if m.agreement is None else f"{m.agreement:.4f}",
            f"{m.latency_p50_ms:.3f}", f"{m.latency_p95_ms:.3f}", _ratio(row.latency_ratio),
            f"{m.throughput_ips:,.0f}/s @{m.batch_size}", _ratio(row.macs_ratio),
            m.execution)
    out = console()
    out.print(table)
    for record in sorted(records, key=lambda r: list(VariantKind).index(r.variant_kind)):
        for note in record.notes:
            out.print(f"  {record.variant_kind.value}: {note}")
