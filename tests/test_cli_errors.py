"""A database URL the CLI cannot use is one ``Error:`` line, on every command, never a
traceback: unparseable, another database, a driver that is not installed, a bad query
option, a server that is down. The password never shows.

Driven in-process through click's CliRunner (a traceback there is an exception left in
``result.exception``), plus the installed console script once, in a subprocess.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from eventsource import cli

PASSWORD = "s3cret-pw"

APP = """\
import eventsource as es


class Orders(es.Projection):
    name = "orders"

    def handle(self, event, session):
        pass

    def reset(self, session):
        pass


PROJECTIONS = [Orders()]
"""
APP_MODULE = "cli_errors_app"
APP_SPEC = f"{APP_MODULE}:PROJECTIONS"

#: Every command that opens the database, with the arguments it needs to get there.
COMMANDS: list[list[str]] = [
    ["db", "upgrade"],
    ["db", "current"],
    ["db", "downgrade", "--yes"],
    ["db", "rebase", "--yes"],
    ["status"],
    ["status", "--app", APP_SPEC, "--json"],
    ["run", APP_SPEC, "--until-caught-up"],
    ["reset", "orders", "--keep-read-model", "--yes"],
    ["rebuild", "orders", "--app", APP_SPEC, "--yes"],
    ["dead-letters", "list"],
    ["dead-letters", "retry", "1", "--app", APP_SPEC],
    ["dead-letters", "discard", "1", "--yes"],
    ["import", "-"],
]


def bad_urls() -> list[tuple[str, str, int, list[str]]]:
    """(case id, URL, exit code, fragments of the one error line)."""
    cases = [
        (
            "port not a number",
            f"postgresql://user:{PASSWORD}@localhost:notaport/x",
            2,
            ["invalid database URL 'postgresql://user:***@localhost:notaport/x'", "notaport"],
        ),
        (
            "not a URL",
            "not a url",
            2,
            ["invalid database URL 'not a url'", "Could not parse"],
        ),
        (
            "mysql",
            f"mysql://user:{PASSWORD}@db.example/x",
            2,
            ["invalid database URL 'mysql://user:***@db.example/x'", "not 'mysql'", "SQLite"],
        ),
        (
            "oracle",
            f"oracle://user:{PASSWORD}@db.example/x",
            2,
            ["invalid database URL", "not 'oracle'"],
        ),
        (
            "unknown driver",
            f"postgresql+nosuchdriver://user:{PASSWORD}@127.0.0.1:1/x",
            2,
            ["invalid database URL", "postgresql.nosuchdriver"],
        ),
        (
            "unknown query option",
            f"postgresql://user:{PASSWORD}@127.0.0.1:1/x?nosuchoption=1",
            2,
            ["invalid database URL", "user:***@", 'invalid connection option "nosuchoption"'],
        ),
        (
            "bad query value",
            f"postgresql://user:{PASSWORD}@127.0.0.1:1/x?connect_timeout=soon",
            2,
            ["invalid database URL", "connect_timeout"],
        ),
        (
            "server down",
            f"postgresql://user:{PASSWORD}@127.0.0.1:1/x",
            1,
            [
                "cannot use the database at postgresql+psycopg://user:***@127.0.0.1:1/x",
                "refused",
            ],
        ),
    ]
    if importlib.util.find_spec("psycopg2") is None:
        cases.append(
            (
                "driver not installed",
                f"postgresql+psycopg2://user:{PASSWORD}@127.0.0.1:1/x",
                2,
                [
                    "database URL 'postgresql+psycopg2://user:***@127.0.0.1:1/x'",
                    "'psycopg2', which is not installed",
                    "plain postgresql:// URL",
                ],
            )
        )
    return cases


BAD_URLS = bad_urls()


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """The CLI's main() sets logger levels for its process; in-process runs must not
    leave them to the tests that follow (they would lose the processor's INFO lines)."""
    names = ["", "eventsource.processor", "alembic.runtime.migration"]
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    root_handlers = list(logging.root.handlers)
    yield
    for logger, level in saved:
        logger.setLevel(level)
    logging.root.handlers[:] = root_handlers


@pytest.fixture
def in_app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The command's working directory, holding the application module."""
    (tmp_path / f"{APP_MODULE}.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delitem(sys.modules, APP_MODULE, raising=False)
    return tmp_path


def assert_one_error_line(result: Result, exit_code: int, fragments: list[str]) -> None:
    detail = f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{detail}") from result.exception
    assert result.exit_code == exit_code, detail
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    assert lines[0].startswith("Error: "), detail
    for fragment in fragments:
        assert fragment in lines[0], detail
    assert PASSWORD not in result.stdout + result.stderr, detail


@pytest.mark.parametrize(
    ("url", "exit_code", "fragments"),
    [pytest.param(url, code, fragments, id=case) for case, url, code, fragments in BAD_URLS],
)
def test_every_command_reports_an_unusable_url_in_one_line(
    in_app_dir: Path, url: str, exit_code: int, fragments: list[str]
) -> None:
    runner = CliRunner()
    for args in COMMANDS:
        result = runner.invoke(cli.main, ["--database-url", url, *args])
        assert_one_error_line(result, exit_code, fragments)


def test_a_url_from_the_environment_is_reported_the_same_way(in_app_dir: Path) -> None:
    _, url, exit_code, fragments = BAD_URLS[0]
    result = CliRunner(env={"DATABASE_URL": url}).invoke(cli.main, ["status"])
    assert_one_error_line(result, exit_code, fragments)


def test_a_sqlite_file_that_cannot_be_created_is_one_line(in_app_dir: Path) -> None:
    url = f"sqlite:///{in_app_dir / 'no' / 'such' / 'dir' / 'x.db'}"
    result = CliRunner().invoke(cli.main, ["--database-url", url, "db", "upgrade"])
    assert_one_error_line(
        result, 1, ["cannot use the database at sqlite:///", "unable to open database file"]
    )
    assert not (in_app_dir / "no").exists()


def test_the_console_script_prints_one_line_without_traceback(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it (a subprocess, a real exit code)."""
    script = shutil.which("eventsource", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "eventsource"]
    env = {**os.environ, "DATABASE_URL": f"postgresql://user:{PASSWORD}@localhost:notaport/x"}
    done = subprocess.run(
        [*command, "status"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "Error: invalid database URL 'postgresql://user:***@localhost:notaport/x': "
        "invalid literal for int() with base 10: 'notaport'"
    ]
    assert done.stdout == ""
