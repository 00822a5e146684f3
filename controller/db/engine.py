"""Engines for the fleet database: SQLite by default, PostgreSQL when given a URL.

SQLite runs in WAL mode with foreign keys on, and SQLAlchemy (not the sqlite3 module) issues
BEGIN IMMEDIATE, so DDL is transactional and a read-then-write transaction takes the write lock
up front instead of failing on upgrade; busy_timeout makes the others wait for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, Connection, make_url

DB_FILE = "edgefleet.db"
BUSY_TIMEOUT_MS = 10_000


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or opened; `url` is safe to log (no password)."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"database {url} is unavailable: {problem}")


def default_url(workdir: Path) -> str:
    """The SQLite database in the controller's working directory."""
    return f"sqlite:///{Path(workdir).resolve() / DB_FILE}"


def safe_url(url: str | URL) -> str:
    """The URL as text with any password masked, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def _json_serializer(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def make_engine(url: str | URL, *, check: bool = True) -> Engine:
    """An engine for `url`: ``sqlite:///path`` or ``postgresql://user@host/db``.

    PostgreSQL URLs without a driver get psycopg 3. With `check`, connects once now and raises
    `DatabaseUnavailable` if that fails, rather than at the first query.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    options: dict[str, Any] = {"json_serializer": _json_serializer,
                               "json_deserializer": msgspec.json.decode}
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, **options)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        engine = create_engine(parsed, pool_pre_ping=True, **options)
    if check:
        try:
            with engine.connect():
                pass
        except exc.DBAPIError as error:
            engine.dispose()
            raise DatabaseUnavailable(safe_url(parsed), _first_line(error.orig)) from error
    return engine


def _sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, in _sqlite_begin
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    # Safe across a controller crash; only power loss can undo the last commits (SQLite docs).
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip() if error is not None else "unknown error"
    return text.splitlines()[0] if text else type(error).__name__
