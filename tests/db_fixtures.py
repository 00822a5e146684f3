"""Databases for tests: SQLite in tmp_path and a real PostgreSQL, a fresh database per test.

PostgreSQL comes from the first of: EDGEFLEET_TEST_PG_URL (an admin URL, e.g.
``postgresql://postgres@db:5432/postgres``); a throwaway cluster started here with initdb and
pg_ctl in a temp dir on a free port (as the ``postgres`` OS user when we are root, since initdb
refuses root); the local server at 127.0.0.1:5432 (user postgres, trust auth). When none is
there, PostgreSQL tests fail with what was tried; they never skip. .ci/run installs PostgreSQL.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL, make_url

from controller.db import make_engine, safe_url, upgrade
from tests.broker import free_ports

PG_URL_VARIABLE = "EDGEFLEET_TEST_PG_URL"
LOCAL_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")


@dataclass(frozen=True)
class PostgresServer:
    admin_url: URL     # connects to a database we may CREATE DATABASE from
    source: str        # where it came from, for failure messages


def _psycopg(url: str | URL) -> URL:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername in (
        "postgresql", "postgres") else parsed


def _reachable(url: URL) -> str | None:
    """None if `url` answers, else why not."""
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return None
    except Exception as error:
        return str(error).strip().splitlines()[0]
    finally:
        engine.dispose()


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit()
                        else 0)
    return candidates[-1] if candidates else None


class ThrowawayCluster:
    """A PostgreSQL cluster in a temp dir, listening on 127.0.0.1 on a free port."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("initdb/pg_ctl not found on PATH nor in /usr/lib/postgresql/*/bin")
        self.pg_ctl = pg_ctl
        self.as_user: list[str] = []
        self.directory = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        if os.geteuid() == 0:
            # initdb refuses to run as root: run the cluster as the postgres OS user.
            runuser = shutil.which("runuser")
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = None
            if runuser is None or owner is None:
                self._remove()
                raise RuntimeError("running as root, and there is no 'postgres' user or no "
                                   "runuser to start initdb as someone else")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.port = free_ports(1)[0]
        try:
            self._run([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                       "-E", "UTF8", "--locale=C", "--no-sync"])
        except RuntimeError:
            self._remove()
            raise

    def _run(self, command: list[str]) -> None:
        result = subprocess.run([*self.as_user, *command], capture_output=True, text=True,
                                timeout=120, cwd=self.directory)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(command[0]).name} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}\n{log}")

    def start(self, *, durable: bool = False) -> URL:
        """Starts it; unless `durable`, without fsync (tests need no crash safety)."""
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options,
                       "-w", "-t", "60", "start"])
        except RuntimeError:
            self._remove()
            raise
        return make_url(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (see the module's docstring for which)."""
    tried: list[str] = []
    given = os.environ.get(PG_URL_VARIABLE)
    if given:
        url = _psycopg(given)
        problem = _reachable(url)
        if problem is not None:
            pytest.fail(f"{PG_URL_VARIABLE}={safe_url(url)} does not answer: {problem}",
                        pytrace=False)
        yield PostgresServer(url, f"{PG_URL_VARIABLE} ({safe_url(url)})")
        return
    cluster: ThrowawayCluster | None = None
    try:
        cluster = ThrowawayCluster()
        url = cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        cluster = None
        tried.append(f"throwaway cluster: {error}")
    if cluster is not None:
        try:
            yield PostgresServer(url, f"throwaway cluster on port {cluster.port}")
        finally:
            cluster.stop()
        return
    local = make_url(LOCAL_PG_URL)
    problem = _reachable(local)
    if problem is None:
        yield PostgresServer(local, f"local server ({safe_url(local)})")
        return
    tried.append(f"local server {safe_url(local)}: {problem}")
    pytest.fail("no PostgreSQL for the database tests. Tried:\n  " + "\n  ".join(
        [f"{PG_URL_VARIABLE}: not set", *tried])
        + "\nInstall PostgreSQL (.ci/run does: apt-get install postgresql) or set "
          f"{PG_URL_VARIABLE} to an admin URL.", pytrace=False)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to a new, empty database: SQLite in tmp_path, or a database of its own
    (edgefleet_test_<random>) on the session's PostgreSQL, dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'edgefleet.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server.admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield server.admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def db_engine(database_url: str) -> Iterator[Engine]:
    """An engine on the test's empty database; disposed afterwards."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def migrated_engine(db_engine: Engine) -> Engine:
    """An engine on the test's database, migrated to the newest schema."""
    upgrade(db_engine)
    return db_engine
