"""What every fleet command needs: the home folder, its settings and the database, opened
with one clear error (and a non-zero exit) when any of them is missing or unreachable."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from alembic.util import CommandError
from rich.table import Table
from sqlalchemy import Engine, exc
from sqlalchemy.engine import make_url

from controller.cli.output import console
from controller.db.engine import DatabaseUnavailable, make_engine, safe_url
from controller.db.migrate import current_revision, head_revision, upgrade
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


def connect(url: str) -> Engine:
    """An engine on `url`, or a ClickException naming it (password masked) and the reason."""
    try:
        return make_engine(url)
    except DatabaseUnavailable as error:
        raise click.ClickException(str(error)) from None
    except exc.ArgumentError:
        raise click.ClickException(
            f"database_url {_masked(url)!r} is not a database URL (use sqlite:///PATH or "
            "postgresql://USER@HOST/DB)") from None
    except (exc.NoSuchModuleError, ImportError) as error:
        raise click.ClickException(f"database {_masked(url)}: unsupported ({error}); use SQLite "
                                   "or PostgreSQL") from None


def _masked(url: str) -> str:
    """A URL that may not parse, with whatever sits where a password would be masked."""
    try:
        return safe_url(url)
    except exc.ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@contextmanager
def open_fleet(home: Path | None, *, migrate: bool = False) -> Iterator[Fleet]:
    """The fleet of `home`; with `migrate` (serve) an older schema is upgraded, otherwise a
    database not at this edgefleet's schema is refused, naming what to do."""
    resolved = resolve_home(home)
    try:
        settings = load_settings(resolved)
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    _refuse_missing_sqlite_file(settings.database_url)
    db = connect(settings.database_url)
    try:
        if migrate:
            _upgrade(db)
        else:
            _require_current_schema(db)
        yield Fleet(resolved, settings, db)
    except (exc.OperationalError, exc.InterfaceError) as error:
        # Lost mid-command (server gone, SQLite locked past its busy timeout): say so, once.
        problem = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise click.ClickException(str(DatabaseUnavailable(safe_url(db.url), problem))
                                   ) from None
    finally:
        db.dispose()


def _refuse_missing_sqlite_file(url: str) -> None:
    """SQLite would create an empty file; a command that reads the fleet should not."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        return  # connect() says why
    if (parsed.get_backend_name() == "sqlite" and parsed.database
            and parsed.database != ":memory:" and not Path(parsed.database).exists()):
        raise click.ClickException(f"database {parsed.database} does not exist: run "
                                   "`edgefleet init` (or check database_url)")


def _upgrade(db: Engine) -> None:
    try:
        upgrade(db)
    except CommandError as error:  # e.g. a revision from a newer edgefleet
        raise click.ClickException(f"database {safe_url(db.url)}: cannot migrate: {error}"
                                   ) from None


def _require_current_schema(db: Engine) -> None:
    revision, head = current_revision(db), head_revision()
    if revision == head:
        return
    where = safe_url(db.url)
    if revision is None:
        raise click.ClickException(f"database {where} has no edgefleet tables: run "
                                   "`edgefleet init` (or check database_url)")
    raise click.ClickException(f"database {where} is at schema revision {revision}, not {head} "
                               "as this edgefleet needs: `edgefleet serve` migrates an older "
                               "one on start")


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
