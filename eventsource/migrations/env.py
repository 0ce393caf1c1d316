"""Alembic environment for the library's own schema.

Used by ``alembic upgrade head`` (through the repository's alembic.ini), by
:func:`eventsource.database.upgrade` and by ``eventsource db upgrade``. Applications
that run these scripts from their own Alembic environment do not use this file; see
the README ("Using your own Alembic").
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

from eventsource import database, models

config = context.config
names = config.attributes.get(database.TABLE_NAMES_ATTRIBUTE) or models.TableNames()
target_metadata = models.tables_for(names).metadata
version_table = config.get_main_option("version_table") or database.VERSION_TABLE


def run_offline() -> None:
    context.configure(
        url=database.database_url(config.get_main_option("sqlalchemy.url")),
        target_metadata=target_metadata,
        literal_binds=True,
        version_table=version_table,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = database.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=version_table,
        render_as_batch=True,  # SQLite can only alter tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
