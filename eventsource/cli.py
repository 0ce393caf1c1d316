"""The ``eventsource`` command: migrate, import events, watch lag, run, reset and rebuild
projections.

A thin layer over the library: each command calls a Python function that can be used
directly (``database.upgrade``, ``status.status``, ``rebuild.rebuild``...).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import textwrap
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, NoReturn, cast

import click
import sqlalchemy as sa

from eventsource import cluster, database, deadletters, errors, versions
from eventsource.bulk import DEFAULT_CHUNK_SIZE, BulkAppendResult
from eventsource.events import Event
from eventsource.horizon import HORIZON_RULES, HorizonRule
from eventsource.processor import (
    DEFAULT_BLOCKED_WARNING_AFTER,
    DEFAULT_LEASE,
    DEFAULT_MAX_POLL_INTERVAL,
    HELD_BACK_BY,
    Processor,
    ProcessorConfig,
)
from eventsource.projection import Projection
from eventsource.rebuild import DEFAULT_WAIT, RebuildProgress, has_reset, rebuild, reset
from eventsource.reshard import DEFAULT_TIMEOUT, cancel_reshard, reshard
from eventsource.retry import RetryPolicy
from eventsource.runner import ProjectionRunner, Runner
from eventsource.status import (
    DEFAULT_LAG_CAP,
    Blocker,
    ProjectionStatus,
    blockers,
    format_age,
    require_schema,
    status,
)
from eventsource.store import EventStore

if TYPE_CHECKING:
    import tqdm

    class _RateBar(tqdm.tqdm[Any]):
        recent_rate: float | None

# tqdm (the rebuild's progress bar) is imported by the command that draws one: it
# costs other commands a tenth of their start-up time.

logger = logging.getLogger("eventsource.cli")

#: Exit code of ``status --max-lag`` when a projection lags more.
EXIT_LAGGING = 3
#: Exit code of ``run --until-caught-up`` when a signal stopped it first (128 + SIGINT).
EXIT_INTERRUPTED = 130


class Context:
    def __init__(self, url: str | None) -> None:
        self.url = url

    def database_url(self) -> sa.URL:
        """The URL the commands use (option, else $DATABASE_URL, else the default);
        one that cannot be parsed is a one-line error naming it, password hidden."""
        try:
            return database.database_url(self.url)
        except (sa.exc.ArgumentError, ValueError) as exc:
            # ValueError: a port that is not a number (SQLAlchemy's int() of it).
            raise BadDatabaseURL(f"invalid database URL {self._raw()}: {exc}") from exc

    def engine(self, *, create: bool = False, **kwargs: Any) -> sa.Engine:
        """An engine on the URL; refuses a SQLite file that does not exist unless ``create``
        (a mistyped path would otherwise leave an empty database behind).

        Every command gets its engine here, so a URL that cannot become one (unparseable,
        another database, a driver that is not installed) is reported here, once.
        """
        url = self.database_url()
        shown = repr(url.render_as_string(hide_password=True))
        if url.get_backend_name() not in SUPPORTED_BACKENDS:
            raise BadDatabaseURL(
                f"invalid database URL {shown}: eventsource supports PostgreSQL "
                "(postgresql://USER@HOST/DB, through psycopg 3) and SQLite "
                f"(sqlite:///FILE), not {url.get_backend_name()!r}"
            )
        missing = None if create else self.missing_sqlite_file()
        if missing:
            raise click.ClickException(
                f"no SQLite database at {missing} (create it with `eventsource db upgrade`)"
            )
        kwargs.setdefault("application_name", _application_name())
        try:
            engine = database.create_engine(url, **kwargs)
        except sa.exc.NoSuchModuleError as exc:  # an unknown driver name after the "+"
            raise BadDatabaseURL(f"invalid database URL {shown}: {exc}") from exc
        except ImportError as exc:  # the dialect's driver module is not installed
            plain = "postgresql://" if url.get_backend_name() == "postgresql" else "sqlite://"
            raise BadDatabaseURL(
                f"database URL {shown} needs the driver {url.get_driver_name()!r}, which is "
                f"not installed ({exc}); a plain {plain} URL uses the one eventsource "
                "installs"
            ) from exc

        @sa.event.listens_for(engine, "handle_error")
        def _bad_setting(context: sa.engine.ExceptionContext) -> BaseException | None:
            # A connection attempt the driver refuses before reaching any server (an
            # unknown option or a bad value in the URL's query): a setting to fix, not
            # a failure to retry. Server down, refused, unknown database: OperationalError,
            # reported (and retried by processors) as such.
            failed = context.sqlalchemy_exception
            if context.connection is None and not isinstance(failed, sa.exc.OperationalError):
                reason = _flat(str(context.original_exception))
                return BadDatabaseURL(f"invalid database URL {shown}: {reason}")
            return None

        return engine

    def missing_sqlite_file(self) -> str | None:
        """The absolute path of the SQLite file the URL names, when it does not exist."""
        url = self.database_url()
        path = url.database
        if url.get_backend_name() != "sqlite" or not path or path == ":memory:":
            return None
        return None if os.path.exists(path) else os.path.abspath(path)

    def describe(self) -> str:
        return self.database_url().render_as_string(hide_password=True)

    def _raw(self) -> str:
        """The URL as given, quoted, its password masked (it may not parse as a URL)."""
        raw = self.url if self.url is not None else os.environ.get(database.DATABASE_URL_ENV)
        return repr(_PASSWORD.sub(r"\1***@", raw or database.DEFAULT_URL))


def _application_name() -> str:
    """``eventsource`` and the command being run ("eventsource db upgrade"): how the
    command's PostgreSQL connections show in ``pg_stat_activity``."""
    names = []
    current = click.get_current_context(silent=True)
    while current is not None and current.parent is not None:
        names.append(current.info_name or "")
        current = current.parent
    return " ".join([database.DEFAULT_APPLICATION_NAME, *reversed(names)])


#: The databases eventsource runs on (DESIGN: PostgreSQL through psycopg 3, and SQLite).
SUPPORTED_BACKENDS = ("postgresql", "sqlite")
#: "user:password@" in a URL, even one SQLAlchemy cannot parse.
_PASSWORD = re.compile(r"(://[^:/?#@]*:)[^/?#]*@")


class BadDatabaseURL(click.ClickException):
    """A database URL no engine can be made from: one ``Error:`` line, exit code 2
    (click's code for bad command-line input), no usage text; the URL may come from
    $DATABASE_URL rather than the command line."""

    exit_code = 2


@contextmanager
def _database_errors(ctx: Context) -> Iterator[None]:
    """Turn connection and schema errors into one-line messages instead of tracebacks."""
    try:
        yield
    except errors.SchemaMissingError as exc:
        raise click.ClickException(f"{ctx.describe()}: {exc}") from exc
    except sa.exc.OperationalError as exc:
        reason = _flat(str(exc.orig))
        raise click.ClickException(
            f"cannot use the database at {ctx.describe()}: {reason}"
        ) from exc
    except errors.EventSourceError as exc:
        raise click.ClickException(str(exc)) from exc


def _flat(message: str) -> str:
    """A driver's message on one line (libpq adds "\n\tIs the server running...")."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    envvar=database.DATABASE_URL_ENV,
    default=None,
    metavar="URL",
    help="Database URL [env: DATABASE_URL; default: sqlite:///eventsource.db]. "
    "postgresql:// URLs use psycopg 3.",
)
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.version_option(package_name="eventsource")
@click.pass_context
def main(click_ctx: click.Context, database_url: str | None, verbose: int) -> None:
    """Operate eventsource: migrate, import events, watch lag, run, reset and rebuild
    projections.

    Projections come from your application as MODULE:ATTRIBUTE, naming a projection,
    a list of projections or of (projection, processor) pairs, or a function
    returning one of those. The current directory is importable.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        # Per-batch lines are INFO; keep them for -vv so progress output stays readable.
        logging.getLogger("eventsource.processor").setLevel(max(level, logging.WARNING))
    click_ctx.obj = Context(database_url)


# -- db ---------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Apply or inspect the library's schema migrations (no alembic.ini needed), and
    rebase stored transaction ids after a restore into another PostgreSQL cluster."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_obj
def db_upgrade(ctx: Context, revision: str) -> None:
    """Create or update the library's tables."""
    engine = ctx.engine(create=True)
    _show_migration_steps()
    with _database_errors(ctx):
        database.upgrade(engine, revision)
        click.echo(f"{ctx.describe()}: at revision {database.current_revision(engine)}")


def _show_migration_steps() -> None:
    """Alembic's "Running upgrade a -> b" lines, as `alembic upgrade` prints them."""
    steps = logging.getLogger("alembic.runtime.migration")
    if steps.getEffectiveLevel() > logging.INFO:  # -v shows them, and the rest, already
        steps.setLevel(logging.INFO)
        steps.addFilter(lambda record: record.getMessage().startswith("Running "))


@db.command("current")
@click.pass_obj
def db_current(ctx: Context) -> None:
    """Show the library schema revision of the database and the newest one available."""
    missing = ctx.missing_sqlite_file()
    if missing:
        click.echo(
            f"current: none  head: {database.head_revision()}  (no database at {missing} "
            "yet: `eventsource db upgrade` creates it)"
        )
        return
    engine = ctx.engine()
    with _database_errors(ctx):
        current = database.current_revision(engine)
        elsewhere = current is None and database.managed_elsewhere(engine)
    head = database.head_revision()
    if elsewhere:
        click.echo(
            f"current: unknown  head: {head}  (the tables exist but are managed by another "
            "Alembic environment: check with your application's `alembic current`)"
        )
        return
    state = "up to date" if current == head else "needs `eventsource db upgrade`"
    click.echo(f"current: {current or 'none'}  head: {head}  ({state})")


@db.command("downgrade")
@click.option("--revision", default="base", show_default=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def db_downgrade(ctx: Context, revision: str, yes: bool) -> None:
    """Revert the library's migrations (base: drop its tables and every event)."""
    _confirm(yes, f"Downgrade {ctx.describe()} to {revision}? This can delete all events.")
    engine = ctx.engine()
    _show_migration_steps()
    with _database_errors(ctx):
        database.downgrade(engine, revision)
    click.echo(f"{ctx.describe()}: at revision {database.current_revision(engine) or 'none'}")


@db.command("rebase")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def db_rebase(ctx: Context, yes: bool) -> None:
    """Rewrite transaction ids another PostgreSQL cluster stored (after a restore or move).

    Needed when stored ids are ahead of this server's, which appends, projections and
    `status` then refuse. Every projection keeps its place. Stop the projections
    first; runs in one transaction; does nothing when no id is ahead.
    """
    _confirm(yes, f"Rebase the transaction ids stored in {ctx.describe()}?")
    engine = ctx.engine()
    store = EventStore()
    with _database_errors(ctx):
        with engine.connect() as connection:
            require_schema(connection, store)
        result = cluster.rebase(engine, store=store)
    click.echo(f"{ctx.describe()}: {result.summary()}")


# -- status -----------------------------------------------------------------------


@main.command("status")
@click.option("--app", "app_spec", metavar="MODULE:ATTR", help="Also list these projections.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of objects).")
@click.option(
    "--max-lag",
    type=click.IntRange(min=0),
    default=None,
    help=f"Exit with code {EXIT_LAGGING} when any partition lags more than N events.",
)
@click.option(
    "--horizon",
    type=click.Choice(HORIZON_RULES),
    default="store",
    show_default=True,
    help="The rule the workers read by (eventsource run --horizon): what holds them back.",
)
@click.pass_obj
def status_command(
    ctx: Context, app_spec: str | None, as_json: bool, max_lag: int | None, horizon: HorizonRule
) -> None:
    """Checkpoint, head, lag (in events, and LAG_TIME: how long the first event not yet
    passed has waited since it was appended), update time and age of every projection
    partition, and on PostgreSQL the open transactions that hold them back."""
    projections = [pair.projection for pair in load_app(app_spec)] if app_spec else []
    engine = ctx.engine()
    # Lag is counted up to a cap; one at least --max-lag still tells every lagging row.
    cap = DEFAULT_LAG_CAP if max_lag is None else max(DEFAULT_LAG_CAP, max_lag)
    with _database_errors(ctx):
        rows = status(engine, projections=projections, lag_cap=cap, horizon=horizon)
        held = blockers(engine, horizon=horizon) if any(row.held_back for row in rows) else []
    if as_json:
        shown = [
            {**row.to_dict(), "held_back_by": [b.to_dict() for b in held] if row.held_back else []}
            for row in rows
        ]
        click.echo(json.dumps(shown, indent=2))
    else:
        click.echo(_table(rows))
        if any(row.held_back for row in rows):
            click.echo(_held_back(held, horizon))
        _echo_versions(ctx, engine, projections)
    if max_lag is not None:
        lagging = [row for row in rows if row.lag > max_lag or row.lag_capped]
        for row in lagging:
            click.echo(
                f"{row.projection} partition {row.partition_key} lags {_lag(row)} events "
                f"(max {max_lag})",
                err=True,
            )
        if lagging:
            sys.exit(EXIT_LAGGING)


def _lag(row: ProjectionStatus) -> str:
    return f"more than {row.lag}" if row.lag_capped else str(row.lag)


def _held_back(held: Sequence[Blocker], rule: HorizonRule) -> str:
    explained = textwrap.wrap(
        "held back: committed events wait for older transactions still open. "
        + HELD_BACK_BY[rule]
        + (" Oldest first:" if held else ""),
        width=84,
    )
    lines = ["", *explained]
    if held:
        lines += [f"  {blocker.describe()}" for blocker in held]
    else:
        lines.append("  (ended just now, or not visible to this database role)")
    return "\n".join(lines)


def _table(rows: Sequence[ProjectionStatus]) -> str:
    if not rows:
        return "no projections have run yet"
    header: tuple[str, ...] = (
        "PROJECTION",
        "PARTITION",
        "CHECKPOINT",
        "HEAD",
        "LAG",
        "LAG_TIME",
        "UPDATED",
        "AGE",
    )
    lines: list[tuple[str, ...]] = [
        (
            row.projection,
            f"{row.partition_key}/{row.total_partitions}",
            str(row.checkpoint)
            + (f" (stops at {row.reshard_boundary})" if row.reshard_boundary is not None else ""),
            str(row.head),
            f"> {row.lag}" if row.lag_capped else str(row.lag),
            _age(row.lag_seconds),
            row.updated_at.strftime("%Y-%m-%d %H:%M:%S") if row.updated_at else "never",
            _age(row.age_seconds),
        )
        for row in rows
    ]
    if any(row.owner is not None for row in rows):  # claimed partitions: who holds them
        header += ("OWNER", "LEASE")
        lines = [
            (*cells, row.owner or "-", _lease(row)) for cells, row in zip(lines, rows, strict=True)
        ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *lines]
    )


def _lease(row: ProjectionStatus) -> str:
    """The lease's age (since its last renewal), and whether it ran out."""
    if row.owner is None or row.lease_age_seconds is None:
        return "-"
    age = (
        f"{row.lease_age_seconds:.1f}s"
        if row.lease_age_seconds < 120
        else _age(row.lease_age_seconds)
    )
    return f"{age} EXPIRED" if row.lease_expired else age


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_age(seconds)


# -- run --------------------------------------------------------------------------


@main.command("run")
@click.argument("app_spec", metavar="MODULE:ATTR")
@click.option(
    "--partition-key",
    type=click.IntRange(min=0),
    envvar="PARTITION_KEY",
    default=None,
    help="Run only this partition [env: PARTITION_KEY; default: all partitions].",
)
@click.option(
    "--total-partitions",
    type=click.IntRange(min=1),
    envvar="TOTAL_PARTITIONS",
    default=1,
    show_default=True,
    help="Partitions each projection is split into [env: TOTAL_PARTITIONS].",
)
@click.option(
    "--claim/--no-claim",
    default=None,
    help="Share the --total-partitions N partitions with every other worker started the "
    "same way, through leases in the database (the default for N > 1 without "
    "--partition-key; with N = 1, --claim makes one worker active and the others its "
    "standbys), or run all N in this process (--no-claim).",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_LEASE,
    show_default=True,
    help="Claimed partitions: seconds before a worker that stopped renewing loses them.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--poll-interval", type=click.FloatRange(min=0), default=0.1, show_default=True)
@click.option(
    "--wake-ups/--no-wake-ups",
    default=True,
    show_default=True,
    help="Wake as soon as a relevant append commits (PostgreSQL: LISTEN/NOTIFY, one "
    "connection per process). Turn off behind poolers that do not carry LISTEN "
    "(PgBouncer in transaction mode): workers then only poll.",
)
@click.option(
    "--max-poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_MAX_POLL_INTERVAL,
    show_default=True,
    help="With wake-ups listening, idle polls back off from --poll-interval up to this.",
)
@click.option("--until-caught-up", is_flag=True, help="Handle what is committed, then exit.")
@click.option(
    "--retry-budget",
    type=click.FloatRange(min=0),
    default=RetryPolicy().budget,
    show_default=True,
    help="Seconds of transient database failures in a row to ride out before giving up.",
)
@click.option(
    "--batch-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="PostgreSQL: bound each statement of a batch (seconds); over it, retried.",
)
@click.option(
    "--horizon",
    type=click.Choice(HORIZON_RULES),
    default="store",
    show_default=True,
    help="PostgreSQL: wait only for this store's writers (store) or for every transaction "
    "on the server (server). See docs/horizon.md.",
)
@click.option(
    "--blocked-warning-after",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_BLOCKED_WARNING_AFTER,
    show_default=True,
    help="PostgreSQL: seconds behind the same open transaction before a WARNING names it.",
)
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics here.")
@click.pass_obj
def run_command(
    ctx: Context,
    app_spec: str,
    partition_key: int | None,
    total_partitions: int,
    claim: bool | None,
    lease: float,
    batch_size: int,
    poll_interval: float,
    wake_ups: bool,
    max_poll_interval: float,
    until_caught_up: bool,
    retry_budget: float,
    batch_timeout: float | None,
    horizon: HorizonRule,
    blocked_warning_after: float,
    metrics_port: int | None,
) -> None:
    """Run the application's projections until Ctrl+C / SIGTERM (or until caught up).

    With --total-partitions N and no --partition-key, identical workers (processes, on
    any machines) share the N partitions: each claims a fair share, they rebalance as
    workers come and go, and a dead worker's partitions are taken over once its lease
    expires. With --partition-key K only partition K runs here, so N processes with
    keys 0..N-1 split the work by hand. --until-caught-up (and --no-claim) runs every
    partition in this process.
    """
    if partition_key is not None and partition_key >= total_partitions:
        raise click.BadParameter(
            f"must be below --total-partitions ({total_partitions})", param_hint="--partition-key"
        )
    if claim and partition_key is not None:
        raise click.BadParameter(
            "--claim shares every partition among the workers; drop --partition-key",
            param_hint="--claim",
        )
    if claim and until_caught_up:
        raise click.BadParameter(
            "--until-caught-up runs every partition here; it does not claim",
            param_hint="--claim",
        )
    if claim is None:
        claim = partition_key is None and total_partitions > 1 and not until_caught_up
    defined = load_app(app_spec)
    metrics = None
    if metrics_port is not None:
        from eventsource.metrics import PrometheusMetrics

        metrics = PrometheusMetrics()
    keys = [partition_key] if partition_key is not None else list(range(total_partitions))
    if claim:
        keys = [0]  # one claiming processor per projection; it runs what it claims
    needs_processors = [pair for pair in defined if pair.processor is None]
    if len(needs_processors) < len(defined):
        given = [
            f"--{name.replace('_', '-')}"
            for name in (
                "partition_key",
                "total_partitions",
                "claim",
                "lease",
                "batch_size",
                "poll_interval",
                "wake_ups",
                "max_poll_interval",
                "retry_budget",
                "batch_timeout",
                "horizon",
                "blocked_warning_after",
            )
            if click.get_current_context().get_parameter_source(name)
            != click.core.ParameterSource.DEFAULT
        ]
        if given:
            click.echo(
                f"note: {', '.join(given)} apply only to projections given without a "
                "processor; the app's (projection, processor) pairs keep their own config",
                err=True,
            )
    # A claiming processor may run every partition at once, beside its coordinator.
    engine = ctx.engine(pool_size=max(5, len(needs_processors) * (total_partitions + 1) + 1))
    store = EventStore()
    pairs: list[ProjectionRunner] = []
    for item in defined:
        if item.processor is not None:
            pairs.append(ProjectionRunner(item.projection, item.processor))
            continue
        for key in keys:
            config = ProcessorConfig(
                batch_size=batch_size,
                partition_key=key,
                total_partitions=total_partitions,
                claim=claim,
                lease=lease,
                poll_interval=poll_interval,
                wake_ups=wake_ups,
                max_poll_interval=max_poll_interval,
                retry=RetryPolicy(budget=retry_budget),
                batch_timeout=batch_timeout,
                horizon=horizon,
                blocked_warning_after=blocked_warning_after,
            )
            pairs.append(
                ProjectionRunner(item.projection, Processor(engine, store, config, metrics=metrics))
            )
    with _database_errors(ctx):
        with engine.connect() as connection:
            require_schema(connection, store)
        if metrics is not None and metrics_port is not None:
            import prometheus_client

            metrics.track_lag(engine, store=store)
            prometheus_client.start_http_server(metrics_port)
        names = ", ".join(sorted({pair.projection.name for pair in pairs}))
        shared = (
            f", claiming shares of {total_partitions} partitions with the other workers"
            if claim
            else ""
        )
        click.echo(f"running {len(pairs)} processor(s): {names}{shared}", err=True)
        runner = Runner()
        if until_caught_up:
            handled = runner.run_until_caught_up(pairs)
            for (name, key), count in sorted(handled.items()):
                click.echo(f"{name} partition {key}: handled {count} events")
            if runner.interrupted:
                click.echo("interrupted before catching up", err=True)
                sys.exit(EXIT_INTERRUPTED)
        else:
            runner.run(pairs)
            click.echo("stopped", err=True)


# -- reset / rebuild --------------------------------------------------------------


_KEEP_READ_MODEL_HELP = (
    "Keep the read model as it is: the replay applies every event again on top of it "
    "(only for idempotent read models, or ones cleared another way)."
)
_WAIT_HELP = "Seconds to wait for the workers' batches in hand before giving up."


@main.command("reset")
@click.argument("name")
@click.option("--app", "app_spec", metavar="MODULE:ATTR", help="Clear its read model (reset()).")
@click.option("--keep-read-model", is_flag=True, help=_KEEP_READ_MODEL_HELP)
@click.option(
    "--wait",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_WAIT,
    show_default=True,
    help=_WAIT_HELP,
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def reset_command(
    ctx: Context, name: str, app_spec: str | None, keep_read_model: bool, wait: float, yes: bool
) -> None:
    """Delete projection NAME's checkpoints and clear its read model, so it replays
    from the start (running workers do so at their next batch).

    The read model is cleared by the projection's reset() hook, so --app is needed;
    without it, or without the hook, pass --keep-read-model to reset anyway. Waits
    for the batches in hand; safe while workers run.
    """
    projection = _find(load_app(app_spec), name) if app_spec else None
    if projection is not None:
        name = projection.checkpoint_name  # its checkpoints' key (orders@v2 for a version)
    if not keep_read_model and (projection is None or not has_reset(projection)):
        why = (
            f"{type(projection).__qualname__} has no reset() method to clear its read model"
            if projection is not None
            else "without --app its read model cannot be cleared"
        )
        raise click.UsageError(
            f"refusing to reset {name!r}: {why}, and the replay would apply every event "
            "again on top of it. Pass --app MODULE:ATTR with a projection that has "
            "reset(), or --keep-read-model if replaying onto the read model is safe."
        )
    engine = ctx.engine()
    with _database_errors(ctx):
        known = {row.projection for row in status(engine)}
        if name not in known and projection is None:
            listed = ", ".join(sorted(known)) or "none"
            raise click.ClickException(f"no checkpoints for projection {name!r} (known: {listed})")
        kept = (
            " (keeping its read model)" if projection is None or not has_reset(projection) else ""
        )
        _confirm(yes, f"Reset projection {name!r}{kept} on {ctx.describe()}?")
        deleted = reset(
            engine, name, projection=projection, keep_read_model=keep_read_model, wait=wait
        )
    cleared = "" if kept else " and cleared its read model"
    click.echo(f"reset {name}: deleted {deleted} checkpoint row(s){cleared}")


@main.command("rebuild")
@click.argument("name")
@click.option("--app", "app_spec", required=True, metavar="MODULE:ATTR")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--total-partitions",
    type=click.IntRange(min=1),
    default=None,
    help="Write checkpoints for this many partitions [default: the count in use].",
)
@click.option("--keep-read-model", is_flag=True, help=_KEEP_READ_MODEL_HELP)
@click.option(
    "--atomic",
    is_flag=True,
    help="One transaction, all or nothing: readers never see a partial read model, but on "
    "PostgreSQL every projection on the server waits for it (small projections only).",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_WAIT,
    show_default=True,
    help=_WAIT_HELP,
)
@click.option(
    "--progress-every",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="When stderr is not a terminal: a progress line this often (a bar otherwise).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def rebuild_command(
    ctx: Context,
    name: str,
    app_spec: str,
    batch_size: int,
    total_partitions: int | None,
    keep_read_model: bool,
    atomic: bool,
    wait: float,
    progress_every: float,
    yes: bool,
) -> None:
    """Clear projection NAME's read model (its reset() hook) and replay every event.

    Online by default: NAME's workers step aside (PostgreSQL; on SQLite they share
    the replay), the replay commits batch by batch, and other projections stay live.
    Readers see the read model rebuilt from empty; if the rebuild fails or is killed,
    the workers or a second rebuild finish it, each event once. --atomic runs it in
    one transaction instead: if it fails or is interrupted, the read model and
    checkpoints stay as they were, but on PostgreSQL every projection on the server
    sees no new event until it commits. With --total-partitions it changes the
    partition count; workers still running with the old count then stop with an error.
    """
    projection = _find(load_app(app_spec), name)
    name = projection.checkpoint_name  # its checkpoints' key (orders@v2 for a version)
    if not has_reset(projection) and not keep_read_model:
        warning = (
            f"{type(projection).__qualname__} has no reset() method: its read model will "
            "not be cleared, and the replay applies every event again on top of it."
        )
        if yes or not sys.stdin.isatty():
            raise click.UsageError(
                f"refusing to rebuild {name!r}: {warning} Add reset(), or pass "
                "--keep-read-model if replaying onto the read model is safe."
            )
        click.echo(f"Warning: {warning}", err=True)
        click.confirm("Rebuild it anyway, keeping the read model?", abort=True)
        keep_read_model = True
    else:
        _confirm(yes, f"Rebuild projection {name!r} on {ctx.describe()}?")
    engine = ctx.engine()
    show = _Progress(tty=sys.stderr.isatty(), every=progress_every)
    redirect: AbstractContextManager[None] = nullcontext()
    if show.tty:
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log lines (a failing handler's) then print above the bar, not through it.
        redirect = logging_redirect_tqdm()
    try:
        with _database_errors(ctx), redirect:
            final = rebuild(
                engine,
                projection,
                batch_size=batch_size,
                total_partitions=total_partitions,
                keep_read_model=keep_read_model,
                wait=wait,
                on_progress=show,
                atomic=atomic,
            )
        show.finish(final)
    finally:
        show.close()
    click.echo(
        f"rebuilt {name}: {final.handled} events handled, {final.done} read, "
        f"in {final.elapsed:.1f}s"
    )


@main.command("reshard")
@click.argument("name")
@click.option(
    "--total-partitions",
    type=click.IntRange(min=1),
    default=None,
    help="The new partition count (required unless --cancel).",
)
@click.option(
    "--app",
    "app_spec",
    metavar="MODULE:ATTR",
    help="Also run here the old partitions that lag behind the boundary (so it finishes "
    "with no worker running).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds the old partitions may go without moving towards the boundary; then "
    "nothing changes.",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_WAIT,
    show_default=True,
    help=_WAIT_HELP,
)
@click.option("--cancel", is_flag=True, help="Remove the boundary of an interrupted reshard.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def reshard_command(
    ctx: Context,
    name: str,
    total_partitions: int | None,
    app_spec: str | None,
    timeout: float,
    wait: float,
    cancel: bool,
    yes: bool,
) -> None:
    """Change projection NAME's partition count while its workers run, each event once.

    Every old partition stops at one boundary, the furthest checkpoint among them; once
    all stand on it (their workers catch up), the new partitions start from exactly
    there, in one transaction. Claiming workers (run --total-partitions without
    --partition-key) take the new count up by themselves; workers with a fixed
    --partition-key stop with an error (restart them with the new count).
    """
    if cancel:
        if total_partitions is not None:
            raise click.UsageError("--cancel takes no --total-partitions")
        engine = ctx.engine()
        with _database_errors(ctx):
            removed = cancel_reshard(engine, name)
        click.echo(f"{name}: {'boundary removed' if removed else 'no reshard in progress'}")
        return
    if total_partitions is None:
        raise click.UsageError("pass --total-partitions N (or --cancel)")
    target: str | Projection = name
    config = None
    if app_spec:
        defined = load_app(app_spec)
        target = _find(defined, name)
        name = target.checkpoint_name
        # The app's own processor settings (its partition strategy above all), if any.
        config = next(
            (i.processor.config for i in defined if i.projection is target and i.processor),
            None,
        )
    _confirm(
        yes, f"Reshard projection {name!r} to {total_partitions} partitions on {ctx.describe()}?"
    )
    engine = ctx.engine()
    click.echo(
        f"resharding {name}: waiting for every old partition to reach the boundary", err=True
    )
    with _database_errors(ctx):
        done = reshard(engine, target, total_partitions, timeout=timeout, wait=wait, config=config)
    click.echo(
        f"resharded {name}: {done.from_partitions} -> {done.to_partitions} partitions at "
        f"position {done.boundary_position} (transaction {done.boundary_transaction_id}) "
        f"in {done.seconds:.1f}s"
    )


class _Progress:
    """Rebuild progress on stderr: a tqdm bar on a terminal; otherwise (CI logs, files)
    a plain line every ``every`` seconds, and the last one when the rebuild ends. Both
    show the rebuild's recent rate (:class:`~eventsource.rebuild.RateWindow`) and the
    ETA from it, not tqdm's own estimate."""

    #: The plain line; tqdm fills it in (and computes the ETA from the rate given).
    LINE = (
        "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt}{unit}, elapsed {elapsed}, "
        "ETA {remaining}, {rate_fmt}"
    )

    def __init__(self, *, tty: bool, every: float) -> None:
        self.tty = tty
        self.every = every
        self.last_line = 0.0
        self.bar: _RateBar | None = None

    def __call__(self, progress: RebuildProgress) -> None:
        if self.tty:
            if self.bar is None:  # the total is known once the read model is reset
                self.bar = _rate_bar(
                    desc=progress.projection,
                    total=progress.total,
                    unit=" events",
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            self.bar.recent_rate = progress.rate
            self.bar.update(progress.done - self.bar.n)
        elif progress.elapsed - self.last_line >= self.every:
            self.last_line = progress.elapsed
            click.echo(self._line(progress), err=True)

    def finish(self, progress: RebuildProgress) -> None:
        if self.bar is not None:
            self.bar.recent_rate = progress.rate
            self.bar.update(progress.done - self.bar.n)
            self.bar.close()
        elif not self.tty and progress.done:
            click.echo(self._line(progress), err=True)

    def close(self) -> None:
        """End the bar where it stands (the rebuild failed); the error follows it."""
        if self.bar is not None:
            self.bar.close()

    def _line(self, progress: RebuildProgress) -> str:
        import tqdm

        return tqdm.tqdm.format_meter(
            n=progress.done,
            total=max(progress.total, progress.done),  # events appended since it began
            elapsed=progress.elapsed,
            prefix=f"rebuild {progress.projection}",
            unit=" events",
            rate=progress.rate or None,
            bar_format=self.LINE,
        )


def _rate_bar(**options: Any) -> _RateBar:
    """A tqdm bar whose rate, and so its ETA, is the one the rebuild gives it
    (``recent_rate``), not tqdm's estimate."""
    import tqdm

    class RateBar(tqdm.tqdm):  # type: ignore[type-arg]
        recent_rate: float | None = None

        @property
        def format_dict(self) -> dict[str, Any]:
            values = dict(super().format_dict)
            if self.recent_rate:
                values["rate"] = self.recent_rate
            return values

    return cast("_RateBar", RateBar(**options))


# -- versions ---------------------------------------------------------------------


@main.group("versions")
def versions_group() -> None:
    """Blue/green rebuilds: a projection's new version (its `version` attribute) builds
    beside the one readers use; see how far each is, then switch readers over."""


@versions_group.command("status")
@click.argument("name", required=False)
@click.option("--app", "app_spec", metavar="MODULE:ATTR", help="Also list versions never run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of objects).")
@click.pass_obj
def versions_status(ctx: Context, name: str | None, app_spec: str | None, as_json: bool) -> None:
    """Checkpoint and lag of each version of versioned projections, and which one
    readers use (of projection NAME only, if given)."""
    projections = [pair.projection for pair in load_app(app_spec)] if app_spec else []
    engine = ctx.engine()
    with _database_errors(ctx):
        rows = versions.status(engine, projections=projections, name=name)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
    elif rows:
        click.echo(_versions_table(rows))
    else:
        click.echo("no versioned projections" + (f" named {name!r}" if name else ""))


@versions_group.command("switch")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@click.option(
    "--app",
    "app_spec",
    metavar="MODULE:ATTR",
    help="Drop the old version's read model with its retire() (when the app defines it).",
)
@click.option("--force", is_flag=True, help="Switch even though VERSION still lags.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0, min_open=True),
    default=versions.DEFAULT_WAIT,
    show_default=True,
    help=_WAIT_HELP,
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def versions_switch(
    ctx: Context,
    name: str,
    version: int,
    app_spec: str | None,
    force: bool,
    wait: float,
    yes: bool,
) -> None:
    """Make VERSION of projection NAME the one readers use, and retire the older ones
    (their checkpoints and dead letters are deleted, in the same transaction).

    Refused, nothing changed, while VERSION lags (unless --force). Waits for the
    batches in hand; safe while workers run.
    """
    retire = None
    if app_spec:
        older = [
            item.projection
            for item in load_app(app_spec)
            if item.projection.name == name
            and (item.projection.version or 0) < version
            and type(item.projection).retire is not Projection.retire
        ]
        retire = max(older, key=lambda projection: projection.version or 0, default=None)
    engine = ctx.engine()
    with _database_errors(ctx):
        dropped = f" and drop {retire!r}'s read model" if retire is not None else ""
        _confirm(
            yes, f"Switch readers of {name!r} to version {version}{dropped} on {ctx.describe()}?"
        )
        result = versions.switch(engine, name, version, force=force, retire=retire, wait=wait)
    click.echo(result.summary())


def _echo_versions(ctx: Context, engine: sa.Engine, projections: Sequence[Projection]) -> None:
    """Below `status`: the versions of versioned projections, when there are any."""
    with _database_errors(ctx):
        rows = versions.status(engine, projections=projections)
    if rows:
        click.echo("")
        click.echo(_versions_table(rows))


def _versions_table(rows: Sequence[versions.VersionStatus]) -> str:
    header = ("PROJECTION", "VERSION", "READERS", "CHECKPOINT", "HEAD", "LAG", "PARTITIONS")
    lines = [
        (
            row.projection,
            "-" if row.version is None else f"v{row.version}",
            "active" if row.active else ("caught up" if row.caught_up else "building"),
            str(row.checkpoint),
            str(row.head),
            str(row.lag),
            f"{row.partitions}/{row.total_partitions}",
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *lines]
    )


# -- dead letters -----------------------------------------------------------------

#: Exit code of ``dead-letters retry`` when an event failed again.
EXIT_STILL_FAILING = 4


@main.group("dead-letters")
def dead_letters_group() -> None:
    """Events that projections quarantined (on_error = OnError.QUARANTINE or
    QUARANTINE_AGGREGATE): list them, retry them once the handler is fixed, or discard
    them. Retries and discards wait for the projection's batches in hand; safe while
    workers run."""


@dead_letters_group.command("list")
@click.option("--projection", "projection_name", metavar="NAME", help="Only this projection's.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with tracebacks).")
@click.pass_obj
def dead_letters_list(ctx: Context, projection_name: str | None, as_json: bool) -> None:
    """Dead letters by projection: the failed events, and the events parked behind them."""
    engine = ctx.engine()
    with _database_errors(ctx):
        entries = deadletters.list_dead_letters(engine, projection=projection_name)
    if as_json:
        click.echo(json.dumps([entry.to_dict() for entry in entries], indent=2))
    else:
        click.echo(_dead_letter_table(entries))


@dead_letters_group.command("retry")
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@click.option("--app", "app_spec", required=True, metavar="MODULE:ATTR")
@click.option("--projection", "projection_name", metavar="NAME", help="With --all.")
@click.option("--all", "every", is_flag=True, help="Retry every dead letter of --projection.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_WAIT,
    show_default=True,
    help=_WAIT_HELP,
)
@click.pass_obj
def dead_letters_retry(
    ctx: Context,
    ids: tuple[int, ...],
    app_spec: str,
    projection_name: str | None,
    every: bool,
    wait: float,
) -> None:
    """Re-apply dead letters through their projection's handler (fix it first).

    Each is applied exactly once, in one transaction that deletes its entry, followed
    by the events parked behind it in version order. One that fails again keeps its
    entry with one more attempt, and the command exits with code 4.
    """
    _dead_letter_selection(ids, projection_name, every)
    projections = [item.projection for item in load_app(app_spec)]
    engine = ctx.engine()
    with _database_errors(ctx):
        chosen = list(ids)
        if every:
            chosen = [
                entry.id
                for entry in deadletters.list_dead_letters(engine, projection=projection_name)
                if not entry.parked
            ]
        if not chosen:
            click.echo(f"no dead letters for projection {projection_name}")
            return
        results = deadletters.retry(engine, chosen, projections, wait=wait)
    for result in results:
        click.echo(_retry_line(result))
    failing = [result for result in results if not result.ok]
    if failing:
        click.echo(
            f"{len(failing)} dead letter(s) still failing: fix the handler and retry, or "
            "discard them (eventsource dead-letters discard ID...)",
            err=True,
        )
        sys.exit(EXIT_STILL_FAILING)


@dead_letters_group.command("discard")
@click.argument("ids", nargs=-1, type=click.IntRange(min=1))
@click.option("--projection", "projection_name", metavar="NAME", help="With --all.")
@click.option("--all", "every", is_flag=True, help="Discard every dead letter of --projection.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_WAIT,
    show_default=True,
    help=_WAIT_HELP,
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def dead_letters_discard(
    ctx: Context,
    ids: tuple[int, ...],
    projection_name: str | None,
    every: bool,
    wait: float,
    yes: bool,
) -> None:
    """Delete dead letters for good: their projection never applies those events.

    Discarding a failed event that others are parked behind releases nothing: the
    earliest parked one becomes the head, and its aggregate stays parked until that
    one is retried or discarded too. Give every id (or --all) to drop them all.
    """
    _dead_letter_selection(ids, projection_name, every)
    engine = ctx.engine()
    with _database_errors(ctx):
        chosen = list(ids)
        if every:
            chosen = [
                entry.id
                for entry in deadletters.list_dead_letters(engine, projection=projection_name)
            ]
        if not chosen:
            click.echo(f"no dead letters for projection {projection_name}")
            return
        listed = " ".join(str(entry_id) for entry_id in chosen)
        _confirm(
            yes,
            f"Discard dead letter(s) {listed} on {ctx.describe()}? Their projection will "
            "never apply those events.",
        )
        result = deadletters.discard(engine, chosen, wait=wait)
    gone = " ".join(str(entry.id) for entry in result.discarded)
    click.echo(f"discarded {len(result.discarded)} dead letter(s): {gone}")
    for head in result.new_heads:
        click.echo(
            f"dead letter {head} now heads its parked aggregate: retry or discard it to "
            "release the aggregate"
        )


def _dead_letter_selection(ids: tuple[int, ...], projection: str | None, every: bool) -> None:
    if every and projection is None:
        raise click.UsageError("--all needs --projection NAME")
    if every and ids:
        raise click.UsageError("give dead-letter IDs or --projection NAME --all, not both")
    if projection is not None and not every:
        raise click.UsageError("--projection goes with --all (or give dead-letter IDs)")
    if not ids and not every:
        raise click.UsageError(
            "give the dead-letter IDs (see `eventsource dead-letters list`), or "
            "--projection NAME --all"
        )


def _dead_letter_table(entries: Sequence[deadletters.DeadLetter]) -> str:
    if not entries:
        return "no dead letters"
    header = (
        "ID",
        "PROJECTION",
        "PARTITION",
        "POSITION",
        "AGGREGATE",
        "VERSION",
        "EVENT",
        "STATE",
        "BEHIND",
        "ATTEMPTS",
        "ERROR",
    )
    lines = [
        (
            str(entry.id),
            entry.projection,
            f"{entry.partition_key}/{entry.total_partitions}",
            str(entry.global_position),
            f"{entry.bounded_context}/{entry.aggregate_type}/{entry.aggregate_id}",
            str(entry.aggregate_version),
            entry.event_type,
            "parked" if entry.parked else "failed",
            str(entry.parked_behind) if entry.parked_behind is not None else "-",
            str(entry.attempts),
            _one_line(f"{entry.error_type}: {entry.error_message}" if entry.error_type else "-"),
        )
        for entry in entries
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *lines]
    )


def _one_line(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _retry_line(result: deadletters.RetryResult) -> str:
    what = f"dead letter {result.id} ({result.projection}, event {result.global_position})"
    if result.status == "gone":
        return f"dead letter {result.id}: already resolved, nothing to do"
    if result.status == "applied":
        more = len(result.applied) - 1
        parked = f", then {more} event(s) parked behind it" if more else ""
        return f"{what}: applied{parked}"
    if result.status == "failed":
        return f"{what}: failed again (attempt {result.attempts}): {_one_line(result.error or '')}"
    return (
        f"{what}: applied {len(result.applied)} event(s), then parked dead letter "
        f"{result.blocked_by} failed (attempt {result.attempts}): "
        f"{_one_line(result.error or '')}; it now heads the aggregate"
    )


# -- import -----------------------------------------------------------------------


@main.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Events validated and written at a time (larger helps when aggregates interleave).",
)
@click.option("--no-progress", is_flag=True, help="Draw no progress bar on stderr.")
@click.pass_obj
def import_command(ctx: Context, file: str, chunk_size: int, no_progress: bool) -> None:
    """Append the events of FILE (JSON Lines; - reads stdin) in one transaction: all of
    them, or nothing.

    One JSON object per line, with the fields of an Event: bounded_context,
    aggregate_type, aggregate_id, event_type, payload, and optionally event_version,
    metadata, event_id, causation_id, correlation_id, trace_id, created_at (ISO 8601
    with a UTC offset) and aggregate_version (the version the event must get; checked).
    Events without one get the next versions of their aggregates, in file order. The
    store's checks apply as to every append; the first error names its line and
    nothing is written. Blank lines are skipped.
    """
    engine = ctx.engine()
    try:
        result, seconds = _run_import(ctx, engine, file, chunk_size, no_progress=no_progress)
    finally:
        engine.dispose()  # its connections closed now, not whenever it is collected
    if not result.events:
        click.echo(f"imported no events: {file} has none")
        return
    click.echo(
        f"imported {result.events:,} events of {result.aggregates:,} aggregates, at positions "
        f"{result.first_position}..{result.last_position}, in {seconds:.1f}s "
        f"({result.events / max(seconds, 1e-9):,.0f} events/s)"
    )


def _run_import(
    ctx: Context, engine: sa.Engine, file: str, chunk_size: int, *, no_progress: bool
) -> tuple[BulkAppendResult, float]:
    """Import FILE in one transaction: the result, and the seconds it took."""
    store = EventStore()
    with _database_errors(ctx), engine.connect() as connection:
        require_schema(connection, store)
    with _import_source(file) as (source, size):
        # Two chunks: bulk_append validates the next one while the server writes one.
        lines = _ImportLines(source, window=2 * chunk_size + 1)
        bar = _import_bar(file, size, disabled=no_progress)
        written = 0

        def progress(count: int) -> None:
            nonlocal written
            written += count
            bar.set_postfix_str(f"{written:,} events", refresh=False)
            bar.update(lines.bytes_through(written - 1) - bar.n)

        started = time.monotonic()
        try:
            with _database_errors(ctx), engine.begin() as connection:
                try:
                    result = store.bulk_append(
                        connection, lines, chunk_size=chunk_size, progress=progress
                    )
                except errors.EventSourceError as exc:
                    about_a_line = lines.error(exc)
                    if about_a_line is None:
                        raise
                    raise about_a_line from exc
            bar.update(bar.total - bar.n if bar.total else 0)
        finally:
            bar.close()
    return result, time.monotonic() - started


#: The fields of an import line: an Event's, and the version it must get.
_IMPORT_REQUIRED = ("bounded_context", "aggregate_type", "aggregate_id", "event_type", "payload")
_IMPORT_OPTIONAL = (
    "event_version",
    "metadata",
    "event_id",
    "causation_id",
    "correlation_id",
    "trace_id",
    "created_at",
    "aggregate_version",
)


#: An item of bulk_append's input, as its errors name one.
_ITEM = re.compile(r"\bitem (\d+)\b")


class _ImportLineError(click.ClickException):
    """A line of the import that is wrong: its number first, and that nothing was written."""

    def __init__(self, number: int, why: str) -> None:
        super().__init__(f"line {number}: {why}; nothing was imported")


@contextmanager
def _import_source(file: str) -> Iterator[tuple[IO[bytes], int]]:
    """The file to import and its size. Anything but a regular file (stdin, a pipe) is
    copied to a temporary file first: the import's transaction then never waits for a
    slow writer (it holds projections back while open), and the size is known."""
    opened: IO[bytes] = (
        click.get_binary_stream("stdin") if file == "-" else open(file, "rb")  # noqa: SIM115
    )
    try:
        try:
            status = os.fstat(opened.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            status = None
        if status is not None and stat.S_ISREG(status.st_mode):
            yield opened, max(0, status.st_size - opened.tell())
            return
        with tempfile.TemporaryFile() as spooled:
            shutil.copyfileobj(opened, spooled, 1 << 20)
            size = spooled.tell()
            spooled.seek(0)
            yield spooled, size
    finally:
        if file != "-":
            opened.close()


class _ImportLines:
    """The events of an import file, one per line, read as bulk_append asks for them.

    Remembers the line number and the bytes read through each of the last ``window``
    events: an error bulk_append raises about an item (``item_index``) then names its
    line, and progress shows bytes written.
    """

    def __init__(self, source: IO[bytes], *, window: int) -> None:
        self.source = source
        self.recent: deque[tuple[int, int]] = deque(maxlen=window)
        self.count = 0

    def __iter__(self) -> Iterator[Event | tuple[Event, int]]:
        read = 0
        for number, line in enumerate(self.source, 1):
            read += len(line)
            item = _import_item(number, line)
            if item is None:
                continue
            self.recent.append((number, read))
            self.count += 1
            yield item

    def _at(self, index: int) -> tuple[int, int] | None:
        offset = index - (self.count - len(self.recent))
        return self.recent[offset] if 0 <= offset < len(self.recent) else None

    def bytes_through(self, index: int) -> int:
        found = self._at(index)
        return 0 if found is None else found[1]

    def error(self, exc: errors.EventSourceError) -> _ImportLineError | None:
        """An error bulk_append raised about one item, as an error about its line."""
        index = getattr(exc, "item_index", None)
        found = None if index is None else self._at(index)
        if found is None:
            return None
        why = str(exc).removeprefix(f"item {index}: ")
        # Another item it names ("also item 12"): its line too.
        why = _ITEM.sub(lambda m: f"line {(self._at(int(m[1])) or (0, 0))[0]}", why)
        return _ImportLineError(found[0], why)


def _import_item(number: int, line: bytes) -> Event | tuple[Event, int] | None:
    """The event of one line (None for a blank one), or _ImportLineError."""
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError as exc:  # also bytes that are not UTF-8
        raise _ImportLineError(number, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _ImportLineError(number, f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {*_IMPORT_REQUIRED, *_IMPORT_OPTIONAL})
    if unknown:
        raise _ImportLineError(
            number,
            f"unknown field(s) {', '.join(map(repr, unknown))} (an event has "
            f"{', '.join(_IMPORT_REQUIRED + _IMPORT_OPTIONAL)})",
        )
    missing = [name for name in _IMPORT_REQUIRED if name not in data]
    if missing:
        raise _ImportLineError(number, f"missing field(s) {', '.join(map(repr, missing))}")
    # An optional field given as null is left out (exporters write nulls).
    fields = {name: value for name, value in data.items() if value is not None}
    fields["payload"] = data["payload"]
    version = fields.pop("aggregate_version", None)
    if "event_id" in fields:
        fields["event_id"] = _import_uuid(number, fields["event_id"])
    if "created_at" in fields:
        fields["created_at"] = _import_timestamp(number, fields["created_at"])
    event = Event(**fields)
    return event if version is None else (event, version)


def _import_uuid(number: int, value: object) -> uuid.UUID:
    try:
        if not isinstance(value, str):
            raise ValueError
        return uuid.UUID(value)
    except ValueError:
        raise _ImportLineError(number, f"event_id must be a UUID string, got {value!r}") from None


def _import_timestamp(number: int, value: object) -> datetime:
    try:
        if not isinstance(value, str):
            raise ValueError
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _ImportLineError(
            number, f"created_at must be ISO 8601 text with a UTC offset, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        raise _ImportLineError(
            number, f"created_at {value!r} has no UTC offset (add one, e.g. +00:00 or Z)"
        )
    return parsed


def _import_bar(file: str, size: int, *, disabled: bool) -> tqdm.tqdm[Any]:
    """Bytes of the file written so far, and the events."""
    import tqdm

    name = "stdin" if file == "-" else os.path.basename(file)
    return tqdm.tqdm(
        total=size,
        desc=f"import {name}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=disabled,
        dynamic_ncols=True,
    )


# -- helpers ----------------------------------------------------------------------


class _Defined:
    """A projection from the app, with the processor the app chose (if any)."""

    def __init__(self, projection: Projection, processor: Processor | None) -> None:
        self.projection = projection
        self.processor = processor


def load_app(spec: str) -> list[_Defined]:
    """Resolve MODULE:ATTR to the projections (and processors) it defines."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        _bad_app(spec, "expected MODULE:ATTRIBUTE, e.g. myapp.projections:PROJECTIONS")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        _bad_app(spec, f"cannot import {module_name!r}: {exc}")
    except Exception as exc:
        _bad_app(spec, f"importing {module_name!r} raised {exc!r}")
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            _bad_app(spec, f"{module_name!r} has no attribute {attribute!r}")
    if callable(value) and not isinstance(value, Projection):
        try:  # a factory function, or a Projection class
            value = value()
        except Exception as exc:
            _bad_app(spec, f"calling {attribute} failed: {exc!r}")
    items = [value] if isinstance(value, Projection | ProjectionRunner | tuple) else value
    try:
        listed = list(items)
    except TypeError:
        _bad_app(spec, f"expected projections or (projection, processor) pairs, got {value!r}")
    defined: list[_Defined] = []
    for item in listed:
        if isinstance(item, Projection):
            defined.append(_Defined(item, None))
        elif isinstance(item, ProjectionRunner):
            defined.append(_Defined(item.projection, item.processor))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], Projection)
            and isinstance(item[1], Processor)
        ):
            defined.append(_Defined(item[0], item[1]))
        else:
            _bad_app(spec, f"{item!r} is neither a Projection nor a (projection, processor) pair")
    if not defined:
        _bad_app(spec, "it defines no projections")
    return defined


def _find(defined: list[_Defined], name: str) -> Projection:
    """The app's projection called ``name``: its checkpoint name (``orders@v2``), or its
    plain name when the app defines only one version of it."""
    for item in defined:
        if item.projection.checkpoint_name == name:
            return item.projection
    versions = [item.projection for item in defined if item.projection.name == name]
    if len(versions) == 1:
        return versions[0]
    if versions:
        named = ", ".join(sorted(p.checkpoint_name for p in versions))
        raise click.ClickException(
            f"the app defines several versions of {name!r} ({named}): name one of them"
        )
    names = ", ".join(sorted({item.projection.checkpoint_name for item in defined}))
    raise click.ClickException(f"unknown projection {name!r}; the app defines: {names}")


def _bad_app(spec: str, why: str) -> NoReturn:
    raise click.BadParameter(why, param_hint=f"'{spec}'")


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError("refusing to proceed without confirmation: pass --yes")
    click.confirm(question, abort=True)
