"""Alembic environment of the helpdesk application.

It migrates two branches into one database, recorded in the application's own
``alembic_version`` table: the application's read-model tables (migrations/versions,
branch "app") and the library's tables (the scripts shipped in the eventsource package,
branch "eventsource"). ``target_metadata`` lists both, so ``revision --autogenerate``
knows every table and proposes changes only for the application's.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from app_models import metadata as app_metadata
from sqlalchemy.pool import NullPool

import eventsource
import eventsource.models

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

target_metadata = [app_metadata, eventsource.models.metadata]


def database_url() -> str:
    """$DATABASE_URL wins over alembic.ini, as everywhere else in eventsource."""
    url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set DATABASE_URL or sqlalchemy.url in alembic.ini")
    return url


def run_migrations_offline() -> None:
    context.configure(
        url=eventsource.database_url(database_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_with(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # main.py hands over its own connection (so the upgrade joins its transaction);
    # pytest-alembic hands over an Engine.
    connection = config.attributes.get("connection")
    if isinstance(connection, sa.Engine):
        with connection.begin() as conn:
            run_with(conn)
        return
    if connection is not None:
        run_with(connection)
        return
    # eventsource.create_engine: psycopg 3 for postgresql:// URLs, the SQLite set-up.
    engine = eventsource.create_engine(database_url(), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            run_with(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
