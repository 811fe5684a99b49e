"""Alembic environment for the registry.

lorafleet calls this with an open connection in ``config.attributes["connection"]`` (already
inside a transaction that holds the migration lock, see ``lorafleet.registry.db.migrate``).
Run from the ``alembic`` command line, it connects to ``$LORAFLEET_DB_URL`` (or the
``sqlalchemy.url`` option).
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from lorafleet.registry.schema import metadata

config = context.config


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = os.environ.get("LORAFLEET_DB_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set LORAFLEET_DB_URL (or sqlalchemy.url) to the registry database URL")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()


def run_migrations_offline() -> None:
    url = os.environ.get("LORAFLEET_DB_URL") or config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
