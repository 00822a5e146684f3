"""The migrations build exactly the schema the models describe, views included, on SQLite and
on a real PostgreSQL, and take it down again; the engine opens both and names an unreachable
one without its password."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from controller.db import (
    DatabaseUnavailable,
    current_revision,
    default_url,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)
from controller.db.schema import Base
from controller.db.views import VIEW_NAMES
from tests.db_fixtures import PostgresServer

TABLES = {"devices", "models", "model_versions", "variants", "rollouts", "rollout_groups",
          "rollout_requests", "deployments", "telemetry", "command_statuses", "audit_log"}


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_the_models_list_every_table() -> None:
    assert set(Base.metadata.tables) == TABLES


def test_upgrade_takes_an_empty_database_to_head(db_engine: Engine) -> None:
    assert current_revision(db_engine) is None

    upgrade(db_engine)

    assert current_revision(db_engine) == head_revision()
    names = inspect(db_engine)
    assert set(names.get_table_names()) == TABLES | {"alembic_version"}
    assert set(names.get_view_names()) == set(VIEW_NAMES)


def test_upgrade_takes_a_url_and_is_a_no_op_at_head(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)

    assert current_revision(database_url) == head_revision()


def test_the_migrated_schema_matches_the_models(migrated_engine: Engine) -> None:
    assert _differences(migrated_engine) == []


def test_the_schema_comparison_notices_a_missing_index(migrated_engine: Engine) -> None:
    # The comparison above proves something only if it can fail.
    with migrated_engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_telemetry_device_id_window_end")

    differences = _differences(migrated_engine)

    assert [d[0] for d in differences] == ["add_index"]  # type: ignore[index]


def test_the_views_exist_and_return_rows(migrated_engine: Engine) -> None:
    with migrated_engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO devices (id, labels, hardware_known, facts, online, first_seen, "
            "agent_version) VALUES ('pi-0001', '{}', false, '{}', true, 1.0, '')"))
        connection.execute(text(
            "INSERT INTO models (name, created_at) VALUES ('digits', 1.0)"))
        connection.execute(text(
            "INSERT INTO model_versions (model_id, version, source_sha256, source_file, "
            "created_at) SELECT id, 1, 'ab', 'digits.onnx', 1.0 FROM models"))
        connection.execute(text(
            "INSERT INTO rollouts (id, name, model_version_id, state, target, config, "
            "current_group, created_at, engine_state) SELECT 'ro-0001', 'first', id, 'running', "
            "'{}', '{}', 0, 1.0, '{}' FROM model_versions"))
        connection.execute(text(
            "INSERT INTO rollout_groups (rollout_id, position, name, state, gate_results) "
            "VALUES ('ro-0001', 0, 'canary', 'soaking', '[]')"))

        fleet = connection.execute(text("SELECT device_id, online FROM fleet_status")).all()
        progress = connection.execute(text(
            "SELECT rollout_id, group_name, targeted, pending FROM rollout_progress")).all()

    assert [(device, bool(online)) for device, online in fleet] == [("pi-0001", True)]
    assert progress == [("ro-0001", "canary", 0, 0)]


def test_downgrade_to_base_removes_every_table_and_view(migrated_engine: Engine) -> None:
    downgrade(migrated_engine, "base")

    names = inspect(migrated_engine)
    assert set(names.get_table_names()) <= {"alembic_version"}
    assert names.get_view_names() == []
    assert current_revision(migrated_engine) is None


def test_a_downgraded_database_upgrades_again(migrated_engine: Engine) -> None:
    downgrade(migrated_engine, "base")
    upgrade(migrated_engine)

    assert _differences(migrated_engine) == []


# --- engine ------------------------------------------------------------------------------------

def test_sqlite_runs_in_wal_with_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(default_url(tmp_path))
    try:
        with engine.connect() as connection:
            pragmas = {name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                       for name in ("journal_mode", "foreign_keys", "synchronous",
                                    "busy_timeout")}
    finally:
        engine.dispose()

    assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "synchronous": 1,
                       "busy_timeout": 10_000}
    assert (tmp_path / "edgefleet.db").exists()


def test_a_postgresql_url_without_a_driver_gets_psycopg(postgres_server: PostgresServer) -> None:
    url = postgres_server.admin_url.set(drivername="postgresql")

    engine = make_engine(url.render_as_string(hide_password=False))
    engine.dispose()

    assert engine.url.drivername == "postgresql+psycopg"


def test_an_unreachable_postgresql_is_named_without_its_password() -> None:
    with pytest.raises(DatabaseUnavailable) as raised:
        make_engine("postgresql://fleet:s3cret@127.0.0.1:1/edgefleet")

    assert "s3cret" not in str(raised.value)
    assert raised.value.url == "postgresql+psycopg://fleet:***@127.0.0.1:1/edgefleet"


def test_a_sqlite_file_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnavailable, match="unable to open database file"):
        make_engine(f"sqlite:///{tmp_path / 'missing' / 'edgefleet.db'}")
