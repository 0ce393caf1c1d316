"""Helpers shared by the benchmark scripts: the throwaway database, its URL, the report.

The scripts run as ``python bench/<name>.py``, which puts ``bench/`` first on
``sys.path``, so they import this module as ``from _common import ...``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

URL_ENV = "EVENTSOURCE_BENCH_PG_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

#: The columns of ``events`` the scripts write by hand (raw INSERT, seeding COPY): all
#: that the store writes but ``transaction_id``, which comes from its column default.
EVENT_WRITE_COLUMNS = (
    "bounded_context",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "partition_hash",
    "event_id",
    "event_type",
    "event_version",
    "payload",
    "metadata",
    "causation_id",
    "correlation_id",
    "trace_id",
    "created_at",
)


def add_url_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--url``: the admin URL, from ``EVENTSOURCE_BENCH_PG_URL`` by default."""
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_ADMIN_URL),
        help=f"admin URL of the PostgreSQL server (env {URL_ENV}; default {DEFAULT_ADMIN_URL}); "
        "a throwaway database is created beside it",
    )


# -- database lifetime -----------------------------------------------------------------


def psycopg_conninfo(url: sa.URL) -> str:
    """A libpq connection string for an SQLAlchemy URL."""
    params: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    for key, value in url.query.items():
        params[key] = value if isinstance(value, str) else value[-1]
    return psycopg.conninfo.make_conninfo(**{k: v for k, v in params.items() if v is not None})


@contextmanager
def throwaway_database(admin_url: sa.URL, prefix: str) -> Iterator[sa.URL]:
    """Create a database named ``prefix`` + random hex, yield its URL, always drop it."""
    name = f"{prefix}{secrets.token_hex(4)}"
    admin = psycopg_conninfo(admin_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin_url.set(database=name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            try:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            except psycopg.errors.SyntaxError:  # PostgreSQL < 13
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        print(f"dropped database {name}", file=sys.stderr)


def server_settings(conninfo: str, names: Sequence[str]) -> dict[str, str]:
    """The server's ``names`` settings, as ``SHOW`` prints them (with their units)."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (list(names),),
        ).fetchall()
    return {str(name): str(value) for name, value in rows}


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: exit the way an interrupt does, through every ``finally``."""
    raise SystemExit(128 + signum)  # unwinds through the finally that drops the database


# -- reporting -------------------------------------------------------------------------


def print_setup(settings: dict[str, str], url: sa.URL) -> None:
    """Print the server's durability settings and the versions a run used."""
    print(
        f"PostgreSQL {settings.get('server_version', '?')}: "
        f"fsync={settings.get('fsync', '?')} "
        f"synchronous_commit={settings.get('synchronous_commit', '?')} "
        f"wal_sync_method={settings.get('wal_sync_method', '?')} "
        f"commit_delay={settings.get('commit_delay', '?')}"
    )
    print(
        f"database {url.database} on {url.host}:{url.port}; "
        f"SQLAlchemy {sa.__version__}, psycopg {psycopg.__version__}, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], aligns: str) -> None:
    """Print a plain-text table; ``aligns`` has one ``<`` (left) or ``>`` per column."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for cell, width, align in zip(cells, widths, aligns, strict=True):
            out.append(cell.ljust(width) if align == "<" else cell.rjust(width))
        return "  ".join(out).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def fmt_rate(value: float) -> str:
    """A rate as a whole number with thousands separators."""
    return f"{value:,.0f}"
