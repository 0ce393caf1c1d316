"""Connecting and migrating: URL rules, engine set-up per dialect, Alembic commands.

One environment variable, ``DATABASE_URL``, is read here and nowhere else; an explicit
argument always wins. Plain ``postgresql://`` / ``postgres://`` URLs mean psycopg 3.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import sqlalchemy as sa

from eventsource import errors, models

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported inside the functions that need it: it costs about half a second
# at import, which every CLI call and every application start would otherwise pay.

DATABASE_URL_ENV = "DATABASE_URL"
DEFAULT_URL = "sqlite:///eventsource.db"
#: The library's own Alembic version table, so it never collides with an application's.
VERSION_TABLE = models.VERSION_TABLE
#: ``config.attributes`` key through which callers pass :class:`~eventsource.models.TableNames`.
TABLE_NAMES_ATTRIBUTE = "eventsource.table_names"
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: The ``PRAGMA synchronous`` levels :func:`create_engine` accepts for SQLite files.
SqliteSynchronous = Literal["FULL", "NORMAL"]
#: FULL: with WAL, every commit syncs the log, so an acknowledged append survives a
#: power loss or an OS crash. NORMAL skips that sync (faster) and may lose the last
#: commits on such a crash (never on an application crash): an explicit opt-in.
SQLITE_SYNCHRONOUS_DEFAULT: SqliteSynchronous = "FULL"
#: libpq settings create_engine gives PostgreSQL connections unless told otherwise: fail
#: a connection attempt after 10 s; probe an idle connection after 30 s, every 10 s, and
#: drop it after 3 lost probes; drop one whose sent data stays unacknowledged for 30 s.
PG_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
#: Connection execution option: this connection only reads (SQLite: deferred BEGIN).
READ_ONLY_OPTION = "eventsource_read_only"


def version_table(table_names: models.TableNames | None = None) -> str:
    """The Alembic version table for a set of table names.

    Each set of names is its own schema with its own revision: a second set in the
    same database must not look already migrated because the first one is.
    """
    if table_names is None or table_names == models.TableNames():
        return VERSION_TABLE
    return f"{VERSION_TABLE}_{table_names.events}"


def database_url(url: str | sa.URL | None = None) -> sa.URL:
    """The URL to use: ``url``, else ``$DATABASE_URL``, else a SQLite file in the cwd."""
    raw = url if url is not None else os.environ.get(DATABASE_URL_ENV) or DEFAULT_URL
    parsed = sa.make_url(raw)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_engine(
    url: str | sa.URL | None = None,
    *,
    sqlite_synchronous: SqliteSynchronous = SQLITE_SYNCHRONOUS_DEFAULT,
    **kwargs: Any,
) -> sa.Engine:
    """An Engine set up the way the store and processors need it.

    On SQLite this applies SQLAlchemy's pysqlite recipe: the driver's own transaction
    handling is turned off and every transaction starts with ``BEGIN IMMEDIATE``, so
    concurrent writers queue on the busy timeout instead of failing with "database is
    locked" when a read lock is upgraded, and savepoints work. A connection with the
    execution option ``eventsource_read_only=True`` starts a deferred transaction
    instead, which WAL mode lets run beside the writer (``status()`` uses it).

    A SQLite file runs in WAL mode with ``PRAGMA synchronous = FULL`` unless
    ``sqlite_synchronous="NORMAL"`` asks otherwise: NORMAL commits faster but a power
    loss or OS crash can roll back commits that were already acknowledged (see the
    README). Like SQLAlchemy's ``sqlite_*`` options, ``sqlite_synchronous`` is ignored
    on other databases, so one call serves both; its value is checked on all of them.
    On PostgreSQL (psycopg) it sets libpq connection timeouts unless the URL or
    ``connect_args`` set them (:data:`PG_CONNECT_DEFAULTS`): a connect timeout, TCP
    keepalives and a TCP user timeout, so a dead network or a vanished server becomes
    an error within about half a minute, which processors retry, instead of a hang.
    Other keyword arguments go to :func:`sqlalchemy.create_engine`.
    """
    if sqlite_synchronous not in get_args(SqliteSynchronous):
        raise errors.ConfigurationError(
            f"sqlite_synchronous must be one of "
            f"{', '.join(repr(level) for level in get_args(SqliteSynchronous))}, "
            f"got {sqlite_synchronous!r}"
        )
    resolved = database_url(url)
    if resolved.get_backend_name() == "postgresql" and resolved.get_driver_name() == "psycopg":
        given = {**resolved.query, **kwargs.get("connect_args", {})}
        defaults = {k: v for k, v in PG_CONNECT_DEFAULTS.items() if k not in given}
        kwargs["connect_args"] = {**defaults, **kwargs.get("connect_args", {})}
    engine = sa.create_engine(resolved, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(
            engine,
            in_memory=resolved.database in (None, "", ":memory:"),
            synchronous=sqlite_synchronous,
        )
    return engine


def _configure_sqlite(
    engine: sa.Engine, *, in_memory: bool, synchronous: SqliteSynchronous
) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(
    url: str | sa.URL | None = None,
    *,
    connection: sa.Connection | None = None,
    table_names: models.TableNames | None = None,
) -> Config:
    """An Alembic Config for the library's migrations, with no ``alembic.ini`` needed."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    # Alembic's Config is a ConfigParser: a "%" in a table name must be escaped.
    config.set_main_option("version_table", version_table(table_names).replace("%", "%%"))
    if connection is None:
        rendered = database_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    else:
        config.attributes["connection"] = connection
    if table_names is not None:
        config.attributes[TABLE_NAMES_ATTRIBUTE] = table_names
    return config


def migrations_path() -> Path:
    """Folder of the library's Alembic scripts (``env.py`` and ``versions/``)."""
    return Path(str(resources.files("eventsource") / "migrations"))


@contextmanager
def _connected(
    target: sa.Engine | sa.Connection | str | sa.URL | None,
) -> Iterator[sa.Connection]:
    if isinstance(target, sa.Connection):
        yield target
        return
    engine = target if isinstance(target, sa.Engine) else create_engine(target)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        if engine is not target:
            engine.dispose()


def upgrade(
    target: sa.Engine | sa.Connection | str | sa.URL | None = None,
    revision: str = "head",
    *,
    table_names: models.TableNames | None = None,
) -> None:
    """Apply the library's migrations (``alembic upgrade head``) programmatically.

    Refuses a database whose tables were created by an application's own Alembic
    (they are upgraded there, with ``alembic upgrade heads``).
    """
    with _connected(target) as connection:
        _refuse_foreign_schema(connection, table_names or models.TableNames())
        from alembic import command

        command.upgrade(alembic_config(connection=connection, table_names=table_names), revision)


def downgrade(
    target: sa.Engine | sa.Connection | str | sa.URL | None = None,
    revision: str = "base",
    *,
    table_names: models.TableNames | None = None,
) -> None:
    """Revert the library's migrations (default: remove its tables)."""
    from alembic import command

    with _connected(target) as connection:
        command.downgrade(alembic_config(connection=connection, table_names=table_names), revision)


def current_revision(
    target: sa.Engine | sa.Connection | str | sa.URL | None = None,
    *,
    table_names: models.TableNames | None = None,
) -> str | None:
    """The library schema revision the database is at (None when not migrated here)."""
    from alembic.runtime.migration import MigrationContext

    with _connected(target) as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": version_table(table_names)}
        )
        return context.get_current_revision()


def managed_elsewhere(
    target: sa.Engine | sa.Connection | str | sa.URL | None = None,
    *,
    table_names: models.TableNames | None = None,
) -> bool:
    """Whether the tables exist without the library's own version table.

    That is the case when an application's Alembic applies the library's scripts.
    """
    names = table_names or models.TableNames()
    with _connected(target) as connection:
        inspector = sa.inspect(connection)
        return inspector.has_table(names.events) and not inspector.has_table(version_table(names))


def _refuse_foreign_schema(connection: sa.Connection, names: models.TableNames) -> None:
    if managed_elsewhere(connection, table_names=names):
        raise errors.ConfigurationError(
            f"the {names.events} table exists but {version_table(names)} does not: the "
            "schema is managed by another Alembic environment (your application's, with "
            "the eventsource branch); upgrade it there with `alembic upgrade heads`"
        )


def head_revision() -> str | None:
    """The newest revision the installed library ships."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()
