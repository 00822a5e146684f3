"""Alembic's entry point for our migrations; controller.db.migrate runs it.

The caller hands over an open connection, already in a transaction, in ``config.attributes``,
so the whole upgrade commits or rolls back as one on both SQLite and PostgreSQL.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from controller.db.schema import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations with controller.db.migrate.upgrade(url), which passes "
                       "an open connection; there is no alembic.ini")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    compare_type=True,
    # SQLite cannot ALTER most things; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
