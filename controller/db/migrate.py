"""Schema migrations, run from code: no alembic.ini, the scripts live in controller/migrations.

`upgrade` brings any database (an empty one included) to the newest schema, each migration in
one transaction on both SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL

from controller.db.engine import make_engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _engine(target: Engine | str | URL) -> tuple[Engine, bool]:
    """The engine to use, and whether we made it (and so must dispose of it)."""
    if isinstance(target, Engine):
        return target, False
    return make_engine(target), True


def upgrade(target: Engine | str | URL, revision: str = "head") -> None:
    """Migrates the database to `revision` (default: the newest)."""
    engine, owned = _engine(target)
    try:
        with engine.begin() as connection:
            command.upgrade(_config(connection), revision)
    finally:
        if owned:
            engine.dispose()


def downgrade(target: Engine | str | URL, revision: str) -> None:
    """Migrates the database back to `revision` ("base" drops everything)."""
    engine, owned = _engine(target)
    try:
        with engine.begin() as connection:
            command.downgrade(_config(connection), revision)
    finally:
        if owned:
            engine.dispose()


def current_revision(target: Engine | str | URL) -> str | None:
    """The database's revision; None for a database never migrated."""
    engine, owned = _engine(target)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if owned:
            engine.dispose()


def head_revision() -> str:
    """The newest revision in controller/migrations."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS}")
    return head
