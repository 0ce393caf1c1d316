"""Helpers the library's migration environments and scripts call at run time.

:func:`run_migrations` is the body of an Alembic ``env.py``: the library's own
environments (``eventsource/migrations/env.py``, which ``eventsource db upgrade`` and
:func:`eventsource.upgrade` run, and the repository's ``alembic/env.py``) call it through
:func:`run_library_migrations`, and an application's ``env.py`` may call it with its own
metadata. :func:`table_names` is what the revision scripts call.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging.config import fileConfig
from typing import Any

import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

from eventsource import database, models

#: ``config.attributes`` key that turns off :func:`run_migrations`' logging set-up, for
#: a program that runs Alembic with an ini file but keeps its own logging.
CONFIGURE_LOGGER_ATTRIBUTE = "configure_logger"


def table_names() -> models.TableNames:
    """Table names for this migration run.

    Taken from ``config.attributes`` (programmatic runs) or ``-x events_table=...``
    style arguments (command line); the defaults otherwise, which is what an
    application's own Alembic environment gets.
    """
    given = context.config.attributes.get(database.TABLE_NAMES_ATTRIBUTE)
    if isinstance(given, models.TableNames):
        return given
    x = context.get_x_argument(as_dictionary=True)
    defaults = models.TableNames()
    return models.TableNames(
        events=x.get("events_table", defaults.events),
        aggregate_heads=x.get("aggregate_heads_table", defaults.aggregate_heads),
        projection_checkpoints=x.get(
            "projection_checkpoints_table", defaults.projection_checkpoints
        ),
        cluster=x.get("cluster_table", ""),  # empty: derived from the events table's name
        dead_letters=x.get("dead_letters_table", ""),  # likewise
        projection_versions=x.get("projection_versions_table", ""),  # likewise
        partition_claims=x.get("partition_claims_table", ""),  # likewise
        partition_workers=x.get("partition_workers_table", ""),  # likewise
    )


def run_library_migrations() -> None:
    """Run the library's migrations: the whole of the library's ``env.py``.

    Target metadata and version table follow :func:`table_names`; the ``version_table``
    option, when the config sets one, wins (:func:`eventsource.database.alembic_config`
    sets it).
    """
    names = table_names()
    run_migrations(
        models.tables_for(names).metadata,
        version_table=(
            context.config.get_main_option("version_table") or database.version_table(names)
        ),
    )


def run_migrations(
    target_metadata: sa.MetaData | Sequence[sa.MetaData] | None,
    **options: Any,
) -> None:
    """Run the migrations of the Alembic environment in progress, as an ``env.py`` does.

    The database, online:

    - ``config.attributes["connection"]`` when given: a ``Connection`` is used as it
      is (its transaction, if one is open, is the migration's); an ``Engine``, which
      is what pytest-alembic passes, is connected here and migrated in one transaction;
    - otherwise the config's ``sqlalchemy.url``, else ``$DATABASE_URL``, else the
      default SQLite file, through :func:`eventsource.create_engine` (so a plain
      ``postgresql://`` URL means psycopg 3).

    Offline (``alembic upgrade --sql``) the same URL only picks the SQL dialect.

    Logging: when the config was read from a file that has logging sections, those
    are applied as Alembic's own ``env.py`` template does (so ``alembic upgrade``
    prints its "Running upgrade" lines), keeping loggers configured before; unless
    ``config.attributes["configure_logger"]`` is false. A config built in code, as
    :func:`eventsource.upgrade` builds it, leaves logging alone.

    ``options`` go to ``context.configure`` (``version_table``, ``include_name``...);
    batch mode is on unless ``render_as_batch=False``: SQLite alters a table by
    copying it.
    """
    config = context.config
    _configure_logging()
    options = {"target_metadata": target_metadata, "render_as_batch": True, **options}
    url = database.database_url(config.get_main_option("sqlalchemy.url"))
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True, **options)
        with context.begin_transaction():
            context.run_migrations()
        return

    given = config.attributes.get("connection")
    if isinstance(given, sa.Connection):
        _run_online(given, options)
    elif isinstance(given, sa.Engine):
        with given.connect() as connection:
            _run_online(connection, options)
    elif given is not None:
        raise TypeError(
            "config.attributes['connection'] must be a SQLAlchemy Connection or Engine, "
            f"got {type(given).__name__}"
        )
    else:
        engine = database.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                _run_online(connection, options)
        finally:
            engine.dispose()


def _run_online(connection: sa.Connection, options: dict[str, Any]) -> None:
    context.configure(connection=connection, **options)
    with context.begin_transaction():
        context.run_migrations()


def _configure_logging() -> None:
    config = context.config
    if config.config_file_name is None or not config.attributes.get(
        CONFIGURE_LOGGER_ATTRIBUTE, True
    ):
        return
    # An ini without logging sections (many applications' have none) would make
    # fileConfig fail; Alembic's template assumes them.
    if config.file_config.has_section("loggers"):
        fileConfig(config.config_file_name, disable_existing_loggers=False)
