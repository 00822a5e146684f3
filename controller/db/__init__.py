"""The fleet database: schema, engines, migrations, the fleet views and telemetry ingest."""

from controller.db.engine import DatabaseUnavailable, default_url, make_engine, safe_url
from controller.db.migrate import current_revision, downgrade, head_revision, upgrade

__all__ = ["DatabaseUnavailable", "current_revision", "default_url", "downgrade",
           "head_revision", "make_engine", "safe_url", "upgrade"]
