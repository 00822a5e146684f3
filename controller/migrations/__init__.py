"""Alembic migrations of the fleet database; run them with controller.db.migrate."""
