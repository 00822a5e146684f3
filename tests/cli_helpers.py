"""Running the `edgefleet` CLI in-process in tests, and reading the database it wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
from click.testing import CliRunner, Result
from sqlalchemy import text

from controller.cli import main
from controller.db import make_engine
from controller.settings import load_settings, write_settings


def invoke(*args: str, home: Path | None = None, env: dict[str, str | None] | None = None
           ) -> Result:
    argv = [*args, "--home", str(home)] if home is not None else list(args)
    return CliRunner().invoke(main, argv, env={"COLUMNS": "250", **(env or {})})


def ok(*args: str, home: Path) -> str:
    result = invoke(*args, home=home)
    assert result.exit_code == 0, f"edgefleet {' '.join(args)} -> {result.exit_code}\n" \
                                  f"{result.output}\n{result.exception!r}"
    return result.output


def as_json(*args: str, home: Path) -> Any:
    result = invoke(*args, "--json", home=home)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refused(result: Result, *fragments: str, code: int = 1) -> str:
    """The CLI's one clear message: the exit code, a single `Error:` line, no traceback."""
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def query(home: Path, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = make_engine(load_settings(home).database_url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(sql), params).mappings()]
    finally:
        engine.dispose()


def copy_home(template: Path, to: Path) -> Path:
    """A copy of a home, its settings pointed at the copy's own database."""
    shutil.copytree(template, to)
    write_settings(to, msgspec.structs.replace(load_settings(template),
                                               database_url=f"sqlite:///{to / 'fleet.db'}"))
    return to
