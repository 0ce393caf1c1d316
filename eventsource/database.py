"""Connecting and migrating: URL rules, engine set-up per dialect, Alembic commands.

One environment variable, ``DATABASE_URL``, is read here and nowhere else; an explicit
argument always wins. Plain ``postgresql://`` / ``postgres://`` URLs mean psycopg 3.
:func:`configure_engine` gives an Engine made elsewhere the set-up :func:`create_engine`
gives its own (on SQLite: ``BEGIN IMMEDIATE``, WAL, a busy timeout), and
:func:`require_configured` is how the library refuses one without it. A database never
migrated is reported by :func:`raise_if_schema_missing`, in the ``except`` clauses
around the library's statements, never by a query of its own.
"""

from __future__ import annotations

import os
import re
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
#: Also ``application_name`` (:data:`DEFAULT_APPLICATION_NAME`, or create_engine's
#: ``application_name=``), unless the URL, ``connect_args`` or ``PGAPPNAME`` name one.
PG_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
#: How create_engine's PostgreSQL connections show in ``pg_stat_activity`` (and in
#: ``eventsource status``'s "held back by" section) unless told otherwise; the CLI's
#: say which command they run ("eventsource run").
DEFAULT_APPLICATION_NAME = "eventsource"
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
    application_name: str = DEFAULT_APPLICATION_NAME,
    **kwargs: Any,
) -> sa.Engine:
    """An Engine set up the way the store and processors need it.

    On SQLite it is :func:`configure_engine`'s set-up (see there): every transaction
    starts with ``BEGIN IMMEDIATE`` (deferred with ``eventsource_read_only=True``), a
    busy timeout, and for a file WAL mode with ``PRAGMA synchronous = FULL`` unless
    ``sqlite_synchronous="NORMAL"`` asks otherwise: NORMAL commits faster but a power
    loss or OS crash can roll back commits that were already acknowledged (see the
    README). Like SQLAlchemy's ``sqlite_*`` options, ``sqlite_synchronous`` is ignored
    on other databases, so one call serves both; its value is checked on all of them.
    On PostgreSQL (psycopg) it sets libpq connection timeouts unless the URL or
    ``connect_args`` set them (:data:`PG_CONNECT_DEFAULTS`): a connect timeout, TCP
    keepalives and a TCP user timeout, so a dead network or a vanished server becomes
    an error within about half a minute, which processors retry, instead of a hang.
    It also names the connections ``application_name`` (default ``"eventsource"``)
    unless the URL, ``connect_args`` or libpq's ``PGAPPNAME`` name them, so they are
    recognisable in ``pg_stat_activity``. Other keyword arguments go to
    :func:`sqlalchemy.create_engine`.
    """
    resolved, kwargs = engine_arguments(
        url, sqlite_synchronous=sqlite_synchronous, application_name=application_name, **kwargs
    )
    return configure_engine(
        sa.create_engine(resolved, **kwargs), sqlite_synchronous=sqlite_synchronous
    )


def engine_arguments(
    url: str | sa.URL | None = None,
    *,
    sqlite_synchronous: SqliteSynchronous = SQLITE_SYNCHRONOUS_DEFAULT,
    application_name: str = DEFAULT_APPLICATION_NAME,
    **kwargs: Any,
) -> tuple[sa.URL, dict[str, Any]]:
    """The URL and keyword arguments :func:`create_engine` (and its async twin) give
    SQLAlchemy: the URL resolved, and on psycopg the libpq defaults added."""
    _check_synchronous(sqlite_synchronous)
    resolved = database_url(url)
    if resolved.get_backend_name() == "postgresql" and resolved.get_driver_name() == "psycopg":
        given = {**resolved.query, **kwargs.get("connect_args", {})}
        if os.environ.get("PGAPPNAME"):  # libpq's own default, which ours would override
            given["application_name"] = os.environ["PGAPPNAME"]
        named = {**PG_CONNECT_DEFAULTS, "application_name": application_name}
        defaults = {k: v for k, v in named.items() if k not in given}
        kwargs["connect_args"] = {**defaults, **kwargs.get("connect_args", {})}
    return resolved, kwargs


def configure_engine(
    engine: sa.Engine,
    *,
    sqlite_synchronous: SqliteSynchronous = SQLITE_SYNCHRONOUS_DEFAULT,
) -> sa.Engine:
    """Set up an Engine made elsewhere (by Flask-SQLAlchemy, SQLModel, your own
    :func:`sqlalchemy.create_engine` call) as :func:`create_engine` would; returns it.

    On SQLite this is SQLAlchemy's pysqlite recipe, with ``BEGIN IMMEDIATE``: the
    driver's own transaction handling is turned off (``isolation_level = None``) and
    every transaction starts with ``BEGIN IMMEDIATE``, so concurrent writers queue on
    the busy timeout (:data:`SQLITE_BUSY_TIMEOUT_MS`) instead of failing with
    "database is locked" when a deferred transaction's read lock is upgraded, and
    savepoints work. A connection with the execution option
    ``eventsource_read_only=True`` starts a deferred transaction instead, which WAL
    mode lets run beside the writer. A file runs in WAL mode with
    ``PRAGMA synchronous = sqlite_synchronous`` (FULL by default, see
    :func:`create_engine`). SQLAlchemy's documented recipe may already be on the
    engine: its plain ``BEGIN`` is replaced by ``BEGIN IMMEDIATE``.

    Call it once at start-up, before the engine serves requests. Calling it again
    adds nothing (asking for another ``sqlite_synchronous`` raises
    :class:`~eventsource.errors.ConfigurationError`). Connections already in the pool
    are set up when next checked out; a :class:`sqlalchemy.engine.Connection` open
    at the time keeps its old behaviour until it is closed. Pass the Engine itself,
    not a copy made by ``engine.execution_options(...)`` (copies made before or after
    share its set-up).

    On PostgreSQL there is nothing to set up and the engine is returned as it is. The
    libpq timeouts :func:`create_engine` adds (:data:`PG_CONNECT_DEFAULTS`) are
    connection arguments, which cannot be added to an existing Engine: give them to
    the engine's maker (``connect_args``, or the URL's query) if you want them.
    """
    _check_synchronous(sqlite_synchronous)
    if not isinstance(engine, sa.Engine):
        raise errors.ConfigurationError(
            f"configure_engine needs a SQLAlchemy Engine, got {type(engine).__name__}"
        )
    if engine.dialect.name != "sqlite":
        return engine
    setup = _sqlite_setup(engine)
    if setup is None:
        sa.event.listen(
            engine,
            "checkout",
            _SqliteSetup(in_memory=_sqlite_in_memory(engine.url), synchronous=sqlite_synchronous),
        )
    elif setup.synchronous != sqlite_synchronous:
        raise errors.ConfigurationError(
            f"this engine is already configured with sqlite_synchronous="
            f"{setup.synchronous!r}; it cannot change to {sqlite_synchronous!r} (make "
            "another engine)"
        )
    if not _has_sqlite_begin(engine):
        sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def require_configured(target: sa.Engine | sa.Connection, *, what: str) -> None:
    """Refuse a SQLite Engine (or Connection) that :func:`configure_engine` did not set up.

    An Engine must carry both listeners. For a Connection (the store sees nothing
    else) it is what matters to the transaction in hand: its begin runs our listener,
    and the driver does not manage transactions behind our savepoints. Cheap (no SQL):
    the store runs it on every SQLite append. A no-op on other databases.
    """
    if target.dialect.name != "sqlite":
        return
    if isinstance(target, sa.Connection):
        dbapi_connection = target.connection.dbapi_connection
        ready = _has_sqlite_begin(target) and (
            getattr(dbapi_connection, "isolation_level", None) is None
        )
    else:
        ready = _has_sqlite_begin(target) and _sqlite_setup(target) is not None
    if not ready:
        raise errors.ConfigurationError(
            f"{what}: this SQLite engine is not set up for eventsource. Its transactions "
            "start deferred (the sqlite3 driver's own handling, or a plain BEGIN as in "
            "SQLAlchemy's pysqlite recipe), so concurrent writers fail with \"database is "
            "locked\", and the driver could commit a savepoint behind the caller's back. "
            "Call eventsource.configure_engine(engine) once on the engine your framework "
            'made, or make it with eventsource.create_engine(url) (see "Engines your '
            'framework made" in the README)'
        )


def refuse_async(target: object, what: str) -> None:
    """Refuse an async engine, connection or session given to synchronous code, saying
    how async code runs it (SQLAlchemy's own error names neither)."""
    if type(target).__module__.startswith("sqlalchemy.ext.asyncio"):
        raise errors.ConfigurationError(
            f"{what} got an {type(target).__name__}, and run synchronously: from async "
            "code, run them through run_sync (async with engine.begin() as conn: await "
            "conn.run_sync(eventsource.upgrade)), and append and read with "
            "eventsource.AsyncEventStore"
        )


def _check_synchronous(level: object) -> None:
    if level not in get_args(SqliteSynchronous):
        raise errors.ConfigurationError(
            f"sqlite_synchronous must be one of "
            f"{', '.join(repr(choice) for choice in get_args(SqliteSynchronous))}, "
            f"got {level!r}"
        )


def _sqlite_in_memory(url: sa.URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


#: ``connection_record.info`` key: this DBAPI connection has had the SQLite set-up.
#: SQLAlchemy clears that dict whenever the record opens a new DBAPI connection.
_SQLITE_SETUP_DONE = "eventsource.sqlite_setup"


class _SqliteSetup:
    """The pool "checkout" listener that sets up each SQLite connection once.

    On checkout rather than on connect, so that connections pooled before
    :func:`configure_engine` are set up too (nothing is closed: an in-memory
    database, which lives as long as its connection, keeps its data). The cost per
    checkout is one dict lookup.
    """

    def __init__(self, *, in_memory: bool, synchronous: SqliteSynchronous) -> None:
        self.in_memory = in_memory
        self.synchronous = synchronous

    def __call__(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if _SQLITE_SETUP_DONE in record.info:
            return
        dbapi_connection.isolation_level = None  # _sqlite_begin issues BEGIN itself
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if not self.in_memory:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute(f"PRAGMA synchronous = {self.synchronous}")
        finally:
            cursor.close()
        record.info[_SQLITE_SETUP_DONE] = self.synchronous


def _sqlite_setup(engine: sa.Engine) -> _SqliteSetup | None:
    # Pool listeners live on the pool, which engine.execution_options() copies share
    # and engine.dispose() hands on to the next pool.
    for listener in engine.pool.dispatch.checkout:
        if isinstance(listener, _SqliteSetup):
            return listener
    return None


def _has_sqlite_begin(target: sa.Engine | sa.Connection) -> bool:
    # The target's own listeners joined with its parent's (an Engine's, for a
    # Connection or an execution_options() copy): what its next begin will run.
    return _sqlite_begin in target.dispatch.begin


def _sqlite_in_transaction(connection: sa.Connection) -> bool:
    """Whether the sqlite3 connection under ``connection`` is inside a transaction
    (aiosqlite's: SQLAlchemy's adapter does not pass the attribute on)."""
    fairy = connection.connection
    dbapi_connection: Any = fairy.dbapi_connection
    if hasattr(dbapi_connection, "in_transaction"):
        return bool(dbapi_connection.in_transaction)
    return bool(fairy.driver_connection.in_transaction)  # type: ignore[union-attr]


def _sqlite_begin(connection: sa.Connection) -> None:
    """The "begin" listener: BEGIN IMMEDIATE, or a deferred BEGIN for read-only use."""
    in_transaction = _sqlite_in_transaction(connection)
    if connection.get_execution_options().get(READ_ONLY_OPTION):
        if not in_transaction:
            connection.exec_driver_sql("BEGIN")
        return
    if in_transaction:
        # A listener registered before ours (SQLAlchemy's pysqlite recipe) has just
        # issued a plain, deferred BEGIN, and nothing has run in it: start over.
        connection.exec_driver_sql("ROLLBACK")
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(
    url: str | sa.URL | None = None,
    *,
    connection: sa.Connection | sa.Engine | None = None,
    table_names: models.TableNames | None = None,
) -> Config:
    """An Alembic Config for the library's migrations, with no ``alembic.ini`` needed.

    ``connection`` may be an Engine too (the library's env.py connects it), which is
    what pytest-alembic hands over; without one, the migrations connect to ``url``.
    """
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
    refuse_async(target, "eventsource's migrations")
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
    (they are upgraded there, with ``alembic upgrade heads``). Refuses a SQLite
    Engine that :func:`configure_engine` has not set up, rather than setting it up
    behind the caller's back: the application's other code shares that engine, and
    the store would refuse it at the first append anyway. A Connection is taken as
    it is (it may be a test's outer transaction); the store checks it when it writes.
    """
    if isinstance(target, sa.Engine):
        require_configured(target, what="eventsource.upgrade()")
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
    """Revert the library's migrations (default: remove its tables).

    Refuses a SQLite Engine that :func:`configure_engine` has not set up, as
    :func:`upgrade` does.
    """
    from alembic import command

    if isinstance(target, sa.Engine):
        require_configured(target, what="eventsource.downgrade()")

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


# -- a database never migrated --------------------------------------------------------

#: The missing table in a driver's error: PostgreSQL's (English) message for
#: SQLSTATE 42P01 undefined_table, and SQLite's, whose only error code is the generic
#: SQLITE_ERROR, so its text is all there is to go on.
_PG_UNDEFINED_TABLE = re.compile(r'relation "(.+)" does not exist')
_SQLITE_NO_SUCH_TABLE = re.compile(r"no such table: (.+)")


def raise_if_schema_missing(
    exc: sa.exc.DBAPIError, names: models.TableNames, *, own_statement: bool
) -> None:
    """Raise :class:`~eventsource.errors.SchemaMissingError` from ``exc`` when it says
    that one of the library's tables does not exist; return otherwise.

    Called in ``except`` clauses around the library's statements, so a database that
    was never migrated costs nothing until it fails. A missing table of the
    application's (a read model a handler writes, flushed by the library's next
    statement) is not the library's to explain: it is only translated when the error
    names one of ``names``' tables, or, with ``own_statement`` (a Core statement of
    the library, which flushes nothing), when PostgreSQL's message names none that
    can be read (a server whose ``lc_messages`` is not English).
    """
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "42P01":
        match = _PG_UNDEFINED_TABLE.search(str(orig).partition("\n")[0])
        folded = False
        aborted = " (PostgreSQL has aborted the transaction: roll it back)"
    elif type(orig).__module__ == "sqlite3" and type(orig).__name__ == "OperationalError":
        match = _SQLITE_NO_SUCH_TABLE.match(str(orig))
        if match is None:
            return
        folded = True  # SQLite compares table names without regard to case
        aborted = ""
    else:
        return
    ours = (
        names.events,
        names.aggregate_heads,
        names.projection_checkpoints,
        names.cluster,
        names.dead_letters,
        names.projection_versions,
        names.partition_claims,
        names.partition_workers,
    )
    if match is None:
        if not own_statement:
            return
        missing = "eventsource tables"
    else:
        named = match.group(1)
        candidates = {named, named.rpartition(".")[2]}  # "main.events", "public.events"
        if folded:
            candidates = {c.casefold() for c in candidates}
            hits = [name for name in ours if name.casefold() in candidates]
        else:
            hits = [name for name in ours if name in candidates]
        if not hits:
            return
        missing = f"{hits[0]} table"
    raise errors.SchemaMissingError(
        f"the database has no {missing}: it has not been migrated. Run `eventsource db "
        "upgrade` (or `alembic upgrade head`, or eventsource.upgrade(engine)) first"
        f"{aborted}"
    ) from exc
