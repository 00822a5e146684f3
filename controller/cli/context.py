"""What every fleet command needs: the home folder, its settings and the database, opened
with one clear error (and a non-zero exit) when any of them is missing or unreachable."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from sqlalchemy import Engine

from controller.cli.output import console
from controller.db.engine import DatabaseUnavailable, make_engine
from controller.settings import ControllerSettings, SettingsError, load_settings, resolve_home

home_option = click.option("--home", type=click.Path(path_type=Path, file_okay=False),
                           envvar="EDGEFLEET_HOME",
                           help="Controller home (default $EDGEFLEET_HOME or ./edgefleet-home).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


class Fleet:
    def __init__(self, home: Path, settings: ControllerSettings, db: Engine) -> None:
        self.home = home
        self.settings = settings
        self.db = db


@contextmanager
def open_fleet(home: Path | None) -> Iterator[Fleet]:
    resolved = resolve_home(home)
    try:
        settings = load_settings(resolved)
        db = make_engine(settings.database_url)
    except (SettingsError, DatabaseUnavailable) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield Fleet(resolved, settings, db)
    finally:
        db.dispose()


def show(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str,
         as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else _cell(row.get(c)) for c in columns))
    console().print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
